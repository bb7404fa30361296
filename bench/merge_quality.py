"""Merge-quality benchmark: how much of the experts' skill survives one merged adapter.

The zoo's LoRA experts of SmolLM2-135M-Instruct (one per synthetic task, r 8 on q/v) are merged
into one adapter by each of the demo's mergelab methods and, as the peer measured in the same run,
by PEFT's ``add_weighted_adapter`` with the matching combination types. Every merge is evaluated
on every task's test file with :func:`mergelab.evaluate.evaluate`; the figure of merit is the
normalised score (merged score ÷ the expert's score on its own task), averaged over the tasks.

    python bench/merge_quality.py [--zoo DIR] [--device auto] [--quick]

``--quick`` runs three pairs only (linear, TIES, DARE-TIES). A full run takes about 10 minutes
on a 2-core CPU once the zoo exists (the demo builds it; the adapters ship with mergelab).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # PEFT would look the base up on the Hub when saving

# (label, combination_type, weight per expert or None for 1/T, extra kwargs, the mergelab merge it
# matches); the weights are the demo's scales (task arithmetic λ 0.3, DARE-TIES λ 0.5).
PEFT_PEERS = [
    ("peft linear (A, B avg)", "linear", None, {}, "linear"),
    ("peft cat (exact mean)", "cat", None, {}, "linear"),
    ("peft cat (sum × 0.3)", "cat", 0.3, {}, "task_arithmetic"),
    ("peft ties (on A, B)", "ties", 1.0, {"density": 0.2}, "ties"),
    ("peft ties_svd r64", "ties_svd", 1.0, {"density": 0.2, "svd_rank": 64}, "ties"),
    ("peft dare_ties_svd ×0.5 r64", "dare_ties_svd", 0.5, {"density": 0.5, "svd_rank": 64}, "dare_ties"),
]
QUICK = {"linear", "ties", "dare_ties"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the demo's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="linear, TIES and DARE-TIES only")
    args = ap.parse_args(argv)

    import torch
    from peft import PeftModel
    from rich.console import Console
    from rich.table import Table

    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.merge.adapter import merge_to_adapter
    from mergelab.recipe import load_recipe
    from mergelab.zoo.build import build_zoo, default_zoo_dir, eval_options, evaluate_cached, \
        expert_table, load_zoo
    from mergelab.zoo.demo import DEMO_MERGES, demo_recipe

    console = Console()
    t_all = time.perf_counter()
    root = args.zoo or default_zoo_dir()
    zoo = load_zoo(root) if (root / "zoo.json").is_file() and args.zoo else \
        build_zoo(root, use_packaged=True, evaluate=False, device=args.device, console=console)
    model, tok = load_model_and_tokenizer(zoo.base, device=args.device, dtype="float32")
    _, expert = expert_table(model, tok, zoo, device=args.device, console=console)
    options = eval_options(args.device)
    files = {t: zoo.data(t, "test") for t in zoo.tasks}
    ours = [m for m in DEMO_MERGES if not args.quick or m.label in QUICK]
    peers = [p for p in PEFT_PEERS if not args.quick or p[4] in QUICK]
    rows: list[dict] = []

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapters: list[tuple[str, str, Path, float]] = []   # (who, label, adapter dir, merge seconds)
        for m in ours:
            t0 = time.perf_counter()
            merge_to_adapter(load_recipe(demo_recipe(zoo, m)), tmp / "ml" / m.label, device=args.device,
                             progress=False)
            adapters.append(("mergelab", m.label, tmp / "ml" / m.label, time.perf_counter() - t0))

        names = list(zoo.tasks)
        peft_model = PeftModel.from_pretrained(model, str(zoo.adapter(names[0])), adapter_name=names[0])
        for n in names[1:]:
            peft_model.load_adapter(str(zoo.adapter(n)), adapter_name=n)
        for i, (label, kind, w, kwargs, _) in enumerate(peers):
            torch.manual_seed(zoo.seed)   # PEFT's DARE draws from the global generator
            weights = [w if w is not None else 1.0 / len(names)] * len(names)
            if "svd_rank" in kwargs:   # PEFT writes svd_rank into the config even where a matrix is smaller
                cfg = model.config
                kv = cfg.num_key_value_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
                kwargs = {**kwargs, "svd_rank": min(kwargs["svd_rank"], kv, cfg.hidden_size)}
            t0 = time.perf_counter()
            peft_model.add_weighted_adapter(names, weights, f"peer{i}", combination_type=kind, **kwargs)
            seconds = time.perf_counter() - t0
            peft_model.save_pretrained(str(tmp / "peft"), selected_adapters=[f"peer{i}"],
                                       save_embedding_layers=False)
            peft_model.delete_adapter(f"peer{i}")
            adapters.append(("peft", label, tmp / "peft" / f"peer{i}", seconds))
        model = peft_model.unload()

        for who, label, path, seconds in adapters:
            t0 = time.perf_counter()
            scores, _ = evaluate_cached(model, tok, zoo, files, adapter=path, options=options, cache=None)
            norm = {t: scores[t] / expert[t] for t in names if expert[t] > 0}
            rows.append({"who": who, "label": label, "scores": scores, "norm": norm,
                         "mean_norm": sum(norm.values()) / len(norm), "merge_s": seconds,
                         "eval_s": time.perf_counter() - t0})
            console.print(f"  {who:8} {label:28} normalised {rows[-1]['mean_norm']:.0%}  "
                          f"(merge {seconds:.1f} s, eval {rows[-1]['eval_s']:.0f} s)")

    table = Table(title="Merge quality, SmolLM2-135M zoo: normalised score (merged ÷ expert)",
                  title_justify="left")
    table.add_column("merge", no_wrap=True, min_width=24)
    for t in names:
        table.add_column(t[:5], justify="right")
    table.add_column("mean", justify="right")
    table.add_column("merge s", justify="right")
    table.add_row("experts (own task score)", *[f"{expert[t]:.2f}" for t in names], "100%", "",
                  end_section=True)
    for r in rows:
        label = r["label"] if r["who"] == "peft" else f"mergelab {r['label']}"
        table.add_row(label, *[f"{r['norm'][t]:.0%}" if t in r["norm"] else "–" for t in names],
                      f"[bold]{r['mean_norm']:.0%}[/]", f"{r['merge_s']:.1f}",
                      end_section=(r is rows[len(ours) - 1]))
    console.print(table)
    best_ml = max((r for r in rows if r["who"] == "mergelab"), key=lambda r: r["mean_norm"])
    best_peft = max((r for r in rows if r["who"] == "peft"), key=lambda r: r["mean_norm"])
    console.print(f"best mergelab: {best_ml['label']} {best_ml['mean_norm']:.0%}; best PEFT: "
                  f"{best_peft['label']} {best_peft['mean_norm']:.0%}; ratio "
                  f"{best_ml['mean_norm'] / max(best_peft['mean_norm'], 1e-9):.2f}×  (goal: best ≥ 90%)")
    console.print(f"total {time.perf_counter() - t_all:.0f} s; device {next(model.parameters()).device}; "
                  f"torch threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
