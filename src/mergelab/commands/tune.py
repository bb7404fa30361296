"""``mergelab tune``: search a recipe's merge parameters (its ``tune:`` section) with optuna."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("tune")
    def tune_cmd(
        recipe: Path = typer.Argument(..., help="Recipe file (YAML) with a tune: section.", show_default=False),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: recipe.tuned.yaml, trials.csv, "
                                 "report.md, search.png (and study.db by default).", show_default=False),
        trials: Optional[int] = typer.Option(None, "--trials", help="Trials to run in this invocation "
                                             "(overrides tune.trials)."),
        time_limit: Optional[str] = typer.Option(None, "--time-limit", help="Stop starting trials after this "
                                                 "long: 600, 90s, 10m, 1h (overrides tune.time_limit)."),
        sampler: Optional[str] = typer.Option(None, "--sampler", help="tpe or cmaes (overrides tune.sampler)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Sampler seed (overrides tune.seed)."),
        storage: Optional[str] = typer.Option(None, "--storage", help="optuna storage URL shared by workers, "
                                              "e.g. sqlite:///study.db or postgresql://... "
                                              "(default: sqlite under --out)."),
        study: Optional[str] = typer.Option(None, "--study", help="Study name; workers with the same storage "
                                            "and name share the study (default: recipe name + fingerprint)."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-trial output."),
    ) -> None:
        """Learn the merge parameters on the search part of the validation rows; report the check part.

        Ctrl-C stops the search and still writes the best trial so far.
        """
        from mergelab.progress import make_console
        from rich.markup import escape

        from mergelab.tune import run_tune

        console = make_console(stderr=True)
        say = (lambda msg: None) if quiet else (lambda msg: console.print(f"[bold]›[/] {escape(msg)}",
                                                                          highlight=False))
        result = run_tune(recipe, out, storage=storage, study=study, trials=trials, time_limit=time_limit,
                          sampler=sampler, seed=seed, device=device, progress=say)
        best = result.best
        if result.optimizer == "gradient":
            start = result.trials[0]
            console.print(f"[green]✓[/] after {result.new_trials} gradient step(s): search {best.search:.4f}, check "
                          f"{best.check:.4f} (start: search {start.search:.4f}, check {start.check:.4f}; stopped "
                          f"by {result.stopped_by})", highlight=False)
        else:
            console.print(f"[green]✓[/] best trial {best.number}: search {best.search:.4f}, check {best.check:.4f} "
                          f"({len(result.trials)} trials in the study; stopped by {result.stopped_by})",
                          highlight=False)
        for w in result.warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
        console.print(f"tuned recipe: {out / 'recipe.tuned.yaml'}; report: {out / 'report.md'}", highlight=False)
