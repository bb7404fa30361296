"""``mergelab run`` and ``mergelab reproduce``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _summary(result, title: str) -> None:
    from mergelab.progress import make_console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("detail")
    colour = {"ran": "green", "skipped": "cyan", "off": "dim", "partial": "bold red"}
    for s in result.stages:
        table.add_row(s.name, f"[{colour.get(s.status, 'white')}]{s.status}[/]", f"{s.seconds:.1f}", s.detail)
    console = make_console(stderr=True)
    console.print(table)
    if isinstance(result.manifest.get("base_scores"), dict):
        console.print(_base_table(result))
    budget = result.manifest.get("budget")
    if budget:
        line = (f"budget {budget['budget_s'] / 60:.1f} min on the {budget['hardware']}, "
                f"planned {budget['planned_s'] / 60:.1f} min; "
                f"used {budget['used_s'] / 60:.1f} min here")
        console.print(line, highlight=False)
    for w in result.warnings:
        console.print(f"[bold red]WARNING:[/] {escape(w)}", highlight=False)
    console.print(f"manifest: {result.out_dir / 'manifest.json'}; report: {result.out_dir / 'report.html'}",
                  highlight=False)


def _base_table(result):
    """The merge's score per task beside the base's (``eval: {compare_base: true}``), each task the
    merge leaves below the base marked."""
    from rich.table import Table

    from mergelab.run.report import BELOW_MARK, read_scores

    base = result.manifest["base_scores"]
    below = set(result.manifest.get("below_base") or [])
    files = (read_scores(result.out_dir) or {}).get("files", {})
    table = Table(title="merge vs base (eval.compare_base)", title_justify="left")
    table.add_column("task")
    for name in ("merge", "base", "vs base"):
        table.add_column(name, justify="right", no_wrap=True)

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.4f}"

    for f, s in files.items():
        task = Path(f).stem
        merged, b = s.get("score"), base.get(task)
        if merged is None or b is None:
            verdict = "–"
        elif task in below:
            verdict = f"[bold red]{BELOW_MARK} {merged - b:+.4f} below base[/]"
        else:
            verdict = f"{merged - b:+.4f}"
        table.add_row(task, fmt(merged), fmt(b), verdict)
    return table


def result_json(result) -> str:
    """What ``--json`` prints: the folder, each stage, the scores, the budget and the warnings."""
    import json

    from mergelab.run.report import read_scores

    scores = read_scores(result.out_dir)
    doc = {"out_dir": str(result.out_dir), "manifest": str(result.out_dir / "manifest.json"),
           "report": str(result.out_dir / "report.html"),
           "stages": [{"name": s.name, "status": s.status, "seconds": s.seconds, "detail": s.detail}
                      for s in result.stages],
           "scores": None if scores is None else {"overall": scores.get("overall"), "files": scores.get("files"),
                                                  "complete": scores.get("complete")},
           "outputs": len(result.manifest.get("outputs", {})),
           # eval: {compare_base: true}: the base's score per task and the tasks the merge leaves below it
           "base_scores": result.manifest.get("base_scores"), "below_base": result.manifest.get("below_base"),
           "budget": result.manifest.get("budget"), "warnings": result.warnings}
    return json.dumps(doc, indent=2, default=str)


def _progress(quiet: bool):
    from mergelab.progress import make_console

    console = make_console(stderr=True)
    return (lambda msg: None) if quiet else (lambda msg: console.print(f"[bold]›[/] {msg}", highlight=False))


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        recipe: Path = typer.Argument(..., help="Recipe file (YAML).", show_default=False),
        out: Path = typer.Option(..., "--out", "-o", help="Run folder (model/, eval/, manifest.json).",
                                 show_default=False),
        device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
        no_rules: bool = typer.Option(False, "--no-rules",
                                      help="Skip the competition rule check (a run outside the competition)."),
        cutoff: Optional[str] = typer.Option(None, "--cutoff", help="Rule check cut-off date (default 2024-05-31)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
        as_json: bool = typer.Option(False, "--json", help="Print the result (stages, scores, budget, warnings) "
                                     "as JSON on stdout; the summary table stays on stderr."),
        budget: Optional[str] = typer.Option(None, "--budget", help="Time budget (60m, 3600, 1h): refuse a "
                                             "recipe whose plan does not fit; stop fine-tuning and evaluation "
                                             "at the deadline (the submission stays complete)."),
        hardware: str = typer.Option("a6000", "--hardware", help="Profile the plan is made for (with --budget)."),
        force: bool = typer.Option(False, "--force", help="With --budget: run even when the plan does not fit "
                                   "(the deadline is still enforced)."),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                             help="Merge although an input or the result holds NaN/Inf "
                                                  "(sets output.allow_nonfinite; recorded in the manifest)."),
    ) -> None:
        """Resolve → check rules → (fine-tune) → merge → evaluate → submission files, with a manifest.

        A rerun into the same folder skips stages whose inputs and outputs match the manifest.
        """
        from mergelab.run.pipeline import run_recipe

        result = run_recipe(recipe, out, device=device, rules=not no_rules, cutoff=cutoff,
                            progress=_progress(quiet), quiet=quiet, budget=budget, hardware=hardware,
                            force=force, warn=lambda m: None, allow_nonfinite=allow_nonfinite)
        _summary(result, f"mergelab run → {out}")
        if as_json:
            typer.echo(result_json(result))

    @app.command("reproduce")
    def reproduce_cmd(
        manifest: Path = typer.Argument(..., help="manifest.json of an earlier run (or its folder).",
                                        show_default=False),
        out: Path = typer.Option(..., "--out", "-o", help="New run folder.", show_default=False),
        device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Run a manifest's recipe again and check that every output file has the same sha256.

        Exit status 0 when all outputs match; 1 naming each input that changed and each output
        that differs.
        """
        from mergelab.progress import make_console

        from mergelab.run.pipeline import reproduce

        result = reproduce(manifest, out, device=device, progress=_progress(quiet), quiet=quiet)
        _summary(result, f"mergelab reproduce → {out}")
        make_console(stderr=True).print(f"[green]✓[/] all {len(result.manifest['outputs'])} output files "
                                   "match the manifest", highlight=False)
