"""``mergelab zoo build`` and ``mergelab demo``: the offline SmolLM2-135M demo."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _task_list(tasks: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None


def _quiet() -> None:
    """Keep the demo's output readable: no transformers/PEFT progress bars or known warnings."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)


def register(app: typer.Typer) -> None:
    zoo_app = typer.Typer(
        help="The offline demo zoo: LoRA experts of SmolLM2-135M-Instruct on synthetic tasks.",
        no_args_is_help=True)

    @zoo_app.command("build")
    def build(
        directory: Optional[Path] = typer.Argument(
            None, help="Zoo folder (default: $MERGELAB_CACHE/zoo, i.e. ~/.cache/mergelab/zoo)."),
        seed: int = typer.Option(0, help="Seed of the task data and of the training."),
        tasks: Optional[str] = typer.Option(None, help="Comma-separated subset of the tasks."),
        device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
        from_package: bool = typer.Option(
            False, "--from-package",
            help="Use the adapters shipped with mergelab where they match, instead of training."),
        no_eval: bool = typer.Option(False, "--no-eval", help="Skip the expert-vs-base table."),
        seed_per_task: bool = typer.Option(
            False, "--seed-per-task",
            help="Train each expert from its own seed (different LoRA A initialisations, as in "
                 "independent runs) instead of one shared seed, as the shipped experts are."),
    ) -> None:
        """Build the zoo: base, task CSVs, one LoRA expert per task, and the expert-vs-base table.

        The base GGUF is converted once; adapters and scores are cached by content, so a second
        run reuses them."""
        from mergelab.progress import make_console

        from mergelab.zoo.base import NOT_COMPETITION_LEGAL
        from mergelab.zoo.build import build_zoo

        _quiet()
        console = make_console()
        zoo = build_zoo(directory, seed=seed, tasks=_task_list(tasks), device=device,
                        use_packaged=from_package, evaluate=not no_eval, seed_per_task=seed_per_task,
                        console=console)
        t = zoo.manifest.get("timings_s", {})
        console.print(f"zoo ready in {zoo.root} ({t.get('total', 0):.0f} s)")
        console.print(f"[dim]{NOT_COMPETITION_LEGAL}[/]")

    @zoo_app.command("package")
    def package(
        directory: Optional[Path] = typer.Argument(
            None, help="A built zoo folder (default: $MERGELAB_CACHE/zoo)."),
    ) -> None:
        """For maintainers: copy a built zoo's adapters into mergelab/zoo/adapters (shipped)."""
        from mergelab.zoo.build import default_zoo_dir, load_zoo, package_zoo

        dest = package_zoo(load_zoo(directory or default_zoo_dir()))
        typer.echo(f"shipped adapters written to {dest}")

    @zoo_app.command("tasks")
    def list_tasks() -> None:
        """List the zoo's synthetic tasks."""
        from mergelab.progress import make_console
        from rich.table import Table

        from mergelab.zoo.tasks import TASKS

        table = Table(caption="steps: LoRA training steps of the task's expert", caption_justify="left")
        table.add_column("task", overflow="fold")
        table.add_column("type", no_wrap=True)
        table.add_column("skill")   # wraps at spaces
        table.add_column("steps", justify="right", no_wrap=True)
        for t in TASKS.values():
            table.add_row(t.name, t.eval_type, t.skill, str(t.steps))
        make_console().print(table)

    app.add_typer(zoo_app, name="zoo")

    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("demo-out"), "--out", "-o",
                                 help="Output folder for report.html, report.md, chart.png and scores (replaced)."),
        zoo_dir: Optional[Path] = typer.Option(
            None, "--zoo", help="Zoo folder (default: $MERGELAB_CACHE/zoo; built if missing)."),
        methods: Optional[str] = typer.Option(
            None, help="Comma-separated merges (default: the demo's seven; also karcher, multislerp, "
                  "sce, wudi, iso_cts, regmean_pp when named)."),
        retrain: bool = typer.Option(
            False, help="Train the experts instead of using the adapters shipped with mergelab."),
        device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors (and the JSON "
                                   "with --json)."),
        as_json: bool = typer.Option(False, "--json", help="Print the results (scores.json's content) as "
                                     "JSON on stdout; the tables and progress go to stderr."),
    ) -> None:
        """Merge real LoRA experts of SmolLM2-135M-Instruct offline and score every merge.

        Builds the zoo if missing, merges all experts with linear, task arithmetic, TIES,
        DARE-TIES, TSV and Iso-C, evaluates the base, each expert and each merge on every task's
        test file, and writes report.html, report.md and chart.png.

        With --json the results go to stdout as JSON (the content of scores.json)."""
        from mergelab.util import check_output_path
        from mergelab.zoo.build import default_zoo_dir
        from mergelab.zoo.demo import run_demo

        import json

        from rich.console import Console

        from mergelab.progress import make_console

        check_output_path(out, [zoo_dir or default_zoo_dir()])   # the demo replaces --out
        _quiet()
        console = Console(quiet=True) if quiet else make_console(stderr=as_json)
        payload = run_demo(out, zoo_dir=zoo_dir, methods=_task_list(methods), use_packaged=not retrain,
                           device=device, console=console)
        if as_json:
            typer.echo(json.dumps(payload, indent=2))
