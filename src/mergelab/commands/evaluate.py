"""``mergelab eval``: evaluate a model on competition CSV files and write submission files."""
from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LengthNorm(str, Enum):
    none = "none"
    tokens = "tokens"
    chars = "chars"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed on a command line → the characters (others kept)."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _print_summary(scores: dict, out: Path) -> None:
    from mergelab.progress import make_console
    from rich.table import Table

    table = Table(title=f"scores ({out / 'scores.json'})")
    table.add_column("file", overflow="fold", min_width=8)
    for col in ("rows", "MC acc", "EM", "R-1", "R-2", "R-L", "score", "missed"):
        table.add_column(col, justify="right", no_wrap=True)
    rows = [*scores["files"].items(), ("overall", scores["overall"])]
    for name, s in rows:
        mc, gen = s["multiple_choice"], s["generation"]
        table.add_row(name, str(s["rows"]), _fmt(mc["accuracy"]), _fmt(gen["exact_match"]),
                      _fmt(gen["rouge1"]), _fmt(gen["rouge2"]), _fmt(gen["rougeL"]), _fmt(s["score"]),
                      str(s["not_reached"]))
    console = make_console()
    console.print(table)
    t = scores["timing"]
    rate = f"{t['rows_per_s']:.2f} rows/s" if t["rows_per_s"] else "-"
    console.print(f"{t['rows']} rows in {t['seconds']:.1f} s ({rate}); submission files in {out}")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Argument(..., help="Model folder (Hugging Face layout, safetensors)."),
        data: List[Path] = typer.Option(..., "--data", help="Competition CSV file; repeat for several."),
        out: Path = typer.Option(..., "--out", help="Output folder: X.csv submissions, predictions/, scores.json."),
        adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter folder applied to MODEL."),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Rows per forward pass."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens generated per generation row."),
        stop: List[str] = typer.Option([], "--stop", help="Stop string (cuts generated text); repeatable; "
                                                          "\\n, \\t, \\r escapes are read."),
        chat: bool = typer.Option(False, "--chat", help="Wrap inputs in the tokenizer's chat template."),
        few_shot: int = typer.Option(0, "--few-shot", min=0, help="Solved examples before each input."),
        shots: Optional[Path] = typer.Option(None, "--shots", help="Labelled CSV to draw few-shot examples from."),
        cot: bool = typer.Option(False, "--cot", help="Chain of thought for multiple choice (then extract the answer)."),
        length_norm: LengthNorm = typer.Option(LengthNorm.none, "--length-norm",
                                               help="Rank choices by log-prob per token/char instead of the sum."),
        max_length: Optional[int] = typer.Option(None, "--max-length", min=8,
                                                 help="Longest input fed to the model (default: the model's limit)."),
        device: Device = typer.Option(Device.auto, "--device", help="Where to run."),
        dtype: DType = typer.Option(DType.auto, "--dtype", help="Weights dtype (auto: fp32 on CPU, bf16 on GPU)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the few-shot draws."),
        force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no table."),
        as_json: bool = typer.Option(False, "--json", help="Print scores.json's content (with the timing) as "
                                     "JSON on stdout instead of the table."),
    ) -> None:
        """Evaluate MODEL (optionally with --adapter) on competition CSV files; write submissions."""
        from pydantic import ValidationError

        from mergelab.evaluate.options import EvalError, EvalOptions

        try:
            options = EvalOptions(
                batch_size=batch_size, max_new_tokens=max_new_tokens, stop=[unescape(x) for x in stop], chat=chat,
                few_shot=few_shot, shots=shots, cot=cot, length_norm=length_norm.value,
                max_length=max_length, device=device.value, dtype=dtype.value, seed=seed)
        except ValidationError as exc:
            msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise EvalError(f"invalid options: {msgs}") from None

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, \
            TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from mergelab.progress import make_console
        from rich.text import Text

        from transformers.utils import logging as hf_logging

        from mergelab.evaluate.runner import check_output_folder, evaluate

        check_output_folder(out, force, [model, adapter, *data, shots])  # before loading anything
        hf_logging.disable_progress_bar()  # ours shows the evaluation; theirs would interleave

        class RowsPerSecond(ProgressColumn):
            def render(self, task) -> Text:
                elapsed = task.elapsed or 0.0
                rate = task.completed / elapsed if elapsed > 0 and task.completed else 0.0
                return Text(f"{rate:.1f} rows/s")

        progress = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), RowsPerSecond(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=make_console(stderr=True))
        task = None

        def on_progress(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task("eval", total=total)
            progress.update(task, completed=done, total=total)

        if quiet:
            scores = evaluate(model, data, out, options, adapter=adapter, force=force)
        else:
            with progress:
                scores = evaluate(model, data, out, options, adapter=adapter, force=force,
                                  on_progress=on_progress)
        if as_json:
            import json

            typer.echo(json.dumps(scores, indent=2, ensure_ascii=False, default=str))
        elif not quiet:
            _print_summary(scores, out)
