"""``mergelab merge RECIPE --out DIR``: run a recipe (or a mergekit YAML config) into a model folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

# Large CPU tensors are allocated with transparent huge pages: far fewer page faults when a merge
# allocates hundreds of MB per tensor. torch reads this once, at its first CPU allocation, so it
# is set here, while the CLI starts and before any command imports torch.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        recipe: Path = typer.Argument(..., help="Recipe file (mergelab YAML/JSON, or a mergekit YAML config).",
                                      show_default=False),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (a Hugging Face model folder).",
                                 show_default=False),
        device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
        force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
        shard_size: Optional[str] = typer.Option(None, "--shard-size",
                                                 help="Largest shard, e.g. 5GB or 500MB (overrides the recipe)."),
        dtype: Optional[str] = typer.Option(None, "--dtype",
                                            help="Output dtype: float32, float16 or bfloat16 (overrides the recipe)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        block_mb: Optional[int] = typer.Option(None, "--block-mb", min=1,
                                               help="MiB of float32 inputs read at once (default 128): "
                                                    "larger tensors merge in row blocks; the bytes do not change."),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                             help="Merge although an input or the result holds NaN/Inf "
                                                  "(output.allow_nonfinite; refused by default)."),
    ) -> None:
        """Merge the models of a recipe into one model folder, streaming tensor by tensor."""
        from rich.markup import escape

        from mergelab.progress import make_console

        from mergelab.merge import merge
        from mergelab.errors import RecipeError
        from mergelab.recipe import Recipe, load_recipe
        from mergelab.util import check_output_path

        check_output_path(out, [recipe])   # the models are checked by merge() itself
        r = load_recipe(recipe)
        overrides = {k: v for k, v in (("shard_size", shard_size), ("dtype", dtype),
                                       ("allow_nonfinite", allow_nonfinite or None)) if v is not None}
        if overrides:
            try:
                r = Recipe.model_validate({**r.model_dump(), "output": {**r.output.model_dump(), **overrides}})
            except RecipeError:
                raise
            except Exception as exc:  # pydantic ValidationError: say which option was wrong
                opts = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
                raise RecipeError(f"{opts}: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}",
                                  hint="--dtype is float32, float16 or bfloat16; --shard-size like 5GB or 500MB") from None
        console = make_console(stderr=True)

        def warn(msg: str) -> None:
            console.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)

        result = merge(r, out, device=device, force=force, progress=not quiet, warn=warn,
                       block_bytes=block_mb << 20 if block_mb else None)
        console.print(f"[green]✓[/] {result}", highlight=False)
