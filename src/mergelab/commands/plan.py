"""``mergelab plan``: per-stage time and memory of a recipe on the target GPU, and a verdict."""
from __future__ import annotations

import json
from pathlib import Path

import typer


def print_plan(plan, console) -> None:
    """The plan as a table (stage, time, peak memory, detail), the probe, and the verdict."""
    from rich.markup import escape
    from rich.table import Table

    from mergelab.plan import fmt_bytes

    hw = plan.hardware
    if plan.probe:
        p = plan.probe
        line = (f"probe on {p['device']} ({p['threads']} thread(s)): matmul {p['matmul_flops'] / 1e9:.1f} GFLOP/s, "
                f"memory copy {p['copy_bandwidth'] / 1e9:.1f} GB/s")
        if "forward_s" in p:
            line += (f", forward call {p['forward_s'] * 1e3:.1f} ms ({p['layer_overhead'] * 1e3:.2f} ms per layer "
                     f"beyond FLOPs), model load {p['load_s']:.2f} s")
        console.print(escape(line), highlight=False)
    table = Table(title=f"plan on {hw.label} — budget {_time(plan.budget_s)}", title_justify="left")
    # stage names, times and sizes stay whole on one line; the detail wraps (a path in it folds)
    table.add_column("stage", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("peak memory", justify="right", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for s in plan.stages:
        over = s.peak_memory > hw.memory
        mem = fmt_bytes(s.peak_memory)
        table.add_row(s.name, _time(s.seconds), f"[red]{mem}[/]" if over else mem, escape(s.detail))
    table.add_row("[bold]total[/]", f"[bold]{_time(plan.total_s)}[/]", fmt_bytes(plan.peak_memory), "")
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    colour = "green" if plan.fits else "red"
    console.print(f"[bold {colour}]{escape(plan.verdict)}[/]", highlight=False)


def _time(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        recipe: Path = typer.Argument(..., help="Recipe file (YAML).", show_default=False),
        hardware: str = typer.Option("a6000", "--hardware", help="Target profile: a6000, a100, h100, l4, cpu."),
        budget: str = typer.Option("60m", "--budget", help="Time budget: 3600, 90s, 60m, 1h."),
        calibrate: bool = typer.Option(False, "--calibrate",
                                       help="Measure this device (matmul, memory copy, a forward call) and "
                                            "plan for it with the measured figures."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines and no table: the exit "
                                   "status says whether it fits (with --json: the JSON only)."),
    ) -> None:
        """Estimate each stage's time and peak GPU memory on the target, and say whether it fits.

        Sizes come from the safetensors headers (no weights are loaded), work from the tokenized
        evaluation files and the finetune section, speeds from mergelab/data/hardware.yaml.
        Exit status 0 when the recipe fits, 1 when it does not.
        """
        from mergelab.progress import make_console

        from mergelab.plan import plan_recipe

        console = make_console(stderr=True)
        plan = plan_recipe(recipe, hardware=hardware, budget=budget, calibrate_probe=calibrate,
                           progress=None if as_json or quiet else (lambda m: console.print(f"[bold]›[/] {m}", highlight=False)))
        if as_json:
            typer.echo(json.dumps(plan.to_dict(), indent=2, default=str))
        elif not quiet:
            print_plan(plan, console)
        if not plan.fits:
            raise typer.Exit(1)
