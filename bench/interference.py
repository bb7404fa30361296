"""Pairwise interference on the demo zoo: which expert's ΔW breaks which task when merged.

For every ordered pair of the zoo's experts (i, j), the two adapters are summed in ΔW space
(``task_arithmetic``, λ 1, an exact LoRA merge: expert i's ΔW untouched, expert j's added) and
task i is scored with the sum, against expert i alone and the base. A cell well below expert i's
own score means that adding expert j's ΔW costs task i that much.

    python bench/interference.py [--split validation] [--tasks grammar] [--layers 0-19] [--zoo DIR]
    python bench/interference.py --overlap-only [--zoo DIR]

First it prints how much the experts' inputs overlap: for every pair of experts and module, the
largest principal cosine between the two A row spaces (the input directions a LoRA ΔW reads),
against random subspaces of the same shape.

``--layers a-b`` adds expert j only on layers a…b (a per-expert weight given as a list across
layers, one point per layer): it localises the layers that carry the interference.

Measured 2026-12-04 (2-core CPU, load ≈ 2; validation files, 40 rows per task): the grammar
expert scores 0.97 alone, 0.38 with the JSON expert added (constant "yes"; the base says
constant "no", 0.62), 0.78 with SQL's, 0.68–0.70 with each other one. ``--tasks grammar
--layers 0-19``: + JSON 0.38 (all of its damage); ``--layers 20-29``: 0.95–0.97 with every expert.
The experts' A row spaces nearly coincide (median cosine 0.995, min 0.926, over 900 pairs ×
modules; random: 0.21): they started from the same seeded initialisation. docs/demo.md ("Why
grammar fails every data-free merge") has the whole table and the reading. A zoo built with
``mergelab zoo build DIR --seed-per-task`` (each expert from its own seed): median 0.274, min
0.151, max 0.703.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _layer_weights(spec: str | None, n_layers: int) -> float | list[float]:
    """``"a-b"`` → a per-layer list, 1 on layers a…b and 0 elsewhere (one point per layer)."""
    if spec is None:
        return 1.0
    lo, sep, hi = spec.partition("-")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise SystemExit(f"--layers {spec!r}: give a layer range such as 0-19") from None
    if not 0 <= a <= b < n_layers:
        raise SystemExit(f"--layers {spec!r}: the base has layers 0–{n_layers - 1}")
    return [1.0 if a <= i <= b else 0.0 for i in range(n_layers)]


def shared_input_cosines(adapters: list) -> tuple[list[float], float]:
    """For every pair of adapters and every module both adapt: the largest cosine of the principal
    angles between their A row spaces (1: the two ΔW read a common input direction); and, as the
    reference, the median of the same figure for pairs of random subspaces of the same shape."""
    import torch

    def top_cosine(a1: torch.Tensor, a2: torch.Tensor) -> float:
        q1, q2 = torch.linalg.qr(a1.double().T)[0], torch.linalg.qr(a2.double().T)[0]   # bases of the rows
        return float(torch.linalg.svdvals(q1.T @ q2).max())

    out, shape = [], None
    for path in sorted(set.intersection(*(set(a.modules) for a in adapters))):
        a = [ad.factors(path).A for ad in adapters]
        shape = tuple(a[0].shape)
        out += [top_cosine(a[i], a[j]) for i in range(len(a)) for j in range(i + 1, len(a))]
    g = torch.Generator().manual_seed(0)
    rand = sorted(top_cosine(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(101))
    return out, rand[50]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="validation", choices=["validation", "test"])
    ap.add_argument("--tasks", default=None, help="comma-separated tasks to score (default: all)")
    ap.add_argument("--layers", default=None, help="add the second expert only on these layers, e.g. 0-19")
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the demo's)")
    ap.add_argument("--overlap-only", action="store_true", help="print the input-subspace overlap and stop")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    from _measure import load_text, open_zoo
    from rich.console import Console
    from rich.table import Table

    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.io.adapter import load_adapter
    from mergelab.merge import merge
    from mergelab.recipe import load_recipe
    from mergelab.zoo.build import eval_options, evaluate_cached, expert_table

    console = Console()
    t_all = time.perf_counter()
    console.print(f"load average at start {load_text()}")
    zoo = open_zoo(args.zoo, args.device, console)
    names = list(zoo.tasks)
    scored = [t.strip() for t in args.tasks.split(",")] if args.tasks else names
    unknown = [t for t in scored if t not in names]
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}; the zoo has {', '.join(names)}")
    cos, random_median = shared_input_cosines([load_adapter(zoo.adapter(t)) for t in names])
    cos.sort()
    console.print(f"input subspaces: largest principal cosine between two experts' A row spaces, median "
                  f"{cos[len(cos) // 2]:.3f}, min {cos[0]:.3f}, max {cos[-1]:.3f} over {len(cos)} pairs × modules; "
                  f"random subspaces of the same shape: median {random_median:.3f}", highlight=False)
    if args.overlap_only:
        return 0
    model, tok = load_model_and_tokenizer(zoo.base, device=args.device, dtype="float32")
    second = _layer_weights(args.layers, model.config.num_hidden_layers)
    base, expert = expert_table(model, tok, zoo, device=args.device, console=console, split=args.split)
    options = eval_options(args.device)
    cells: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in scored:
            for j in names:
                if j == i:
                    continue
                recipe = load_recipe({
                    "base": {"path": str(zoo.base)},
                    "experts": [{"path": str(zoo.adapter(i))}, {"path": str(zoo.adapter(j)), "weight": second}],
                    "method": {"name": "task_arithmetic", "lambda": 1.0}, "output": {"format": "lora"}})
                out = Path(tmp) / f"{i}+{j}"
                merge(recipe, out, progress=False)
                s, _ = evaluate_cached(model, tok, zoo, {i: zoo.data(i, args.split)}, adapter=out,
                                       options=options, cache=None)
                cells[(i, j)] = s[i]
                console.print(f"  {i} + {j}: {s[i]:.2f} (alone {expert[i]:.2f}, base {base[i]:.2f})", highlight=False)

    where = f", expert j on layers {args.layers}" if args.layers else ""
    table = Table(title=f"Task i scored with expert i + expert j ({args.split} files{where}); ▼ below the base",
                  title_justify="left")
    table.add_column("task i", no_wrap=True)
    table.add_column("base", justify="right")
    table.add_column("i alone", justify="right")
    for j in names:
        table.add_column(f"+{j[:5]}", justify="right")
    for i in scored:
        row = [f"{cells[(i, j)]:.2f}" + ("▼" if cells[(i, j)] < base[i] else "") if j != i else "–" for j in names]
        table.add_row(i, f"{base[i]:.2f}", f"{expert[i]:.2f}", *row)
    console.print(table)
    console.print(f"total {time.perf_counter() - t_all:.0f} s; load average at end {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
