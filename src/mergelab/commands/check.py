"""``mergelab check RECIPE``: are the recipe's models allowed in the competition?

Exit status: 0 when every rule passes (warnings allowed), 1 when any rule fails (a violation or a
model that cannot be verified), 2 when the check itself could not run (e.g. the Hub is
unreachable) or the recipe cannot be read. The failing case is raised as
:class:`~mergelab.hub.rules.RulesNotMetError` (exit code 1), which the CLI shows as one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer


def _recipe_models(path: Path) -> tuple[list, list | None]:
    """``[(role, ref), ...]`` of the recipe's base and experts (or slices), and a layer stack's
    slices (None without), validated by the recipe loader."""
    from mergelab.hub.rules import recipe_refs, recipe_stack
    from mergelab.recipe import load_recipe

    recipe = load_recipe(path)
    return recipe_refs(recipe), recipe_stack(recipe)


def register(app: typer.Typer) -> None:
    @app.command("check")
    def check(
        recipe: Path = typer.Argument(..., help="Recipe file (YAML) whose models are checked."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success; the exit status "
                                   "says it (a failure is still one message on stderr)."),
        cutoff: str = typer.Option("2024-05-31", "--cutoff", metavar="DATE",
                                   help="Upload cut-off: a date (inclusive, UTC) or an ISO time."),
        max_params: float = typer.Option(8e9, "--max-params", help="Most parameters a model may have."),
        params_tolerance: float = typer.Option(
            0.10, "--params-tolerance", min=0.0,
            help="Fraction above --max-params reported as a warning instead of a violation "
                 "(nominal-8B models such as Llama-3-8B have 8.03B)."),
    ) -> None:
        """Check every model of a recipe against the competition rules (public, date, size, licence).

        Asks the Hugging Face Hub (HF_ENDPOINT); no weights are downloaded.

        Exit status 0: all rules pass; 1: a rule fails; 2: the check could not run.
        """
        from mergelab.hub.rules import RulesNotMetError, check_models, report_table
        from mergelab.progress import make_console

        refs, stack = _recipe_models(recipe)
        report = check_models(refs, cutoff=cutoff, max_params=max_params, params_tolerance=params_tolerance,
                              stack=stack)
        counts = {s: sum(f.status == s for f in report.findings) for s in ("ok", "warn", "violation", "unverifiable")}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        if as_json:
            typer.echo(json.dumps(report.to_dict(), indent=2))
        elif not quiet:
            make_console().print(report_table(report))
        if not report.ok:  # exit status 1: a MergelabError with its own exit code, shown as one message
            raise RulesNotMetError(
                f"{recipe} does not pass the competition rules ({summary})"
                + ("" if as_json or quiet else "; see the table above"),
                hint="pin revisions on or before the cut-off (`revision: cutoff`) and use public Hub models of at "
                     "most the allowed size; docs/rules.md explains each rule")
        if not as_json and not quiet:
            make_console().print(f"{recipe} [bold green]passes[/] the competition rules ({summary}).", highlight=False)
