"""Merge-quality benchmark: how much of the experts' skill survives one merged adapter.

The zoo's LoRA experts of SmolLM2-135M-Instruct (one per synthetic task, r 8 on q/v) are merged
into one adapter by each of the demo's mergelab methods and, as the peer measured in the same run,
by PEFT's ``add_weighted_adapter`` with the matching combination types. Every merge is evaluated
on every task's test file with :func:`mergelab.evaluate.evaluate`; the figure of merit is the
normalised score (merged score ÷ the expert's score on its own task), averaged over the tasks.

    python bench/merge_quality.py [--zoo DIR] [--device auto] [--quick]
    python bench/merge_quality.py --methods ties,regmean,karcher,multislerp,sce,wudi,iso_cts,regmean_pp
    python bench/merge_quality.py --split validation --methods iso_c:lambda=2.0,iso_c,regmean_pp:alpha=0.95

``--quick`` runs three pairs only (linear, TIES, DARE-TIES). A full run takes about 10 minutes
on a 2-core CPU once the zoo exists (the demo builds it; the adapters ship with mergelab).

``--methods`` measures the named mergelab merges only (the demo's, and the newer methods of
``mergelab.zoo.demo.MORE_MERGES``), without the PEFT peers; a name may change the merge's
parameters (``iso_c:lambda=2.0``, ``regmean_pp:alpha=0.9+lambda=1.2``, a per-layer list
``iso_c:lambda=1.5/3.0`` interpolated from the first layer to the last — LiNeS' layer-increasing
scale — or per-expert ``weights=1/1/1.5/1/1/1`` in the zoo's task order), and ``--split validation`` scores on the
validation files instead of the test files — how the demo's scales are chosen. It
prints per merge: the normalised score, the tasks it leaves below the base model (merging worse
than not merging), the merge's wall and CPU time and its memory. Each merge runs in a fresh child
process (``--merge-child``), so its memory is its own: the peak RSS of that process (``VmHWM``;
not ``ru_maxrss``, which a child inherits from its parent's map across vfork + exec) and how far
the merge raised it above the peak after the imports (torch, mergelab). ``nuslerp`` takes
exactly two experts and is left out (the zoo has six).

Measured 2026-12-03 (2-core CPU shared with another benchmark, load 3.6–6.2; docs/demo.md has the
per-task table), normalised score on the test files / tasks below the base / merge wall time /
peak RSS of the merging process: karcher 60.7 % / 2 / 4.7 s / 329 MiB, iso_cts 69.4 % / 2 / 1.6 s
/ 268 MiB, wudi 26.2 % / 3 / 219 s / 351 MiB; multislerp, sce merged (4.0 s / 366 MiB, 6.9 s /
328 MiB) but not evaluated; regmean_pp 93.9 % / 0 / 392 s / 1373 MiB. Each evaluation took
9–15 minutes at that load (≈ 46 s with both cores free). Targets of issue 18: data-free ≥ 85 %
and overall ≥ 95 % not met; no task below the base for the best (regmean_pp) met.
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


def _own_peak_rss_mb() -> float | None:
    """This process's own peak RSS in MiB: ``VmHWM`` of ``/proc/self/status`` (None elsewhere).

    Not ``ru_maxrss``: a child started by vfork + exec inherits, in ``ru_maxrss``, the high-water
    mark the parent's memory map had recorded (measured: 475 MiB for every child of a parent that
    held the model, whatever the child did); ``VmHWM`` belongs to the child's own map."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _merge_child(recipe_json: str, out_dir: str, device: str) -> int:
    """In a fresh process: merge one recipe into an adapter; print time and memory (RESULT line)."""
    import json

    from _measure import cpu_seconds, peak_rss_mb, print_result

    from mergelab.merge.adapter import merge_to_adapter
    from mergelab.recipe import load_recipe

    recipe = load_recipe(json.loads(Path(recipe_json).read_text()))
    rss0, cpu0 = _own_peak_rss_mb() or peak_rss_mb(), cpu_seconds()
    t0 = time.perf_counter()
    merged = merge_to_adapter(recipe, out_dir, device=device, progress=False)
    print_result({"merge_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - cpu0,
                  "rss_after_imports_mb": rss0, "peak_rss_mb": _own_peak_rss_mb() or peak_rss_mb(),
                  "rank": merged.max_rank, "max_rel_error": merged.max_rel_error})
    return 0


def _merge_in_child(recipe: dict, out_dir: Path, device: str) -> dict:
    import json

    from _measure import child_result

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f"{out_dir.name}.recipe.json"
    path.write_text(json.dumps(recipe))
    return child_result([sys.executable, __file__, "--merge-child", str(path), str(out_dir), device],
                        out_dir.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the demo's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="linear, TIES and DARE-TIES only")
    ap.add_argument("--methods", default=None,
                    help="comma-separated mergelab merges (the demo's and its opt-in ones), each optionally with "
                         "changed parameters: iso_c:lambda=2.0, regmean_pp:alpha=0.9+lambda=1.2, iso_c:lambda=1.5/3 (per layer, "
                         "first to last), "
                         "regmean_pp:weights=1/1/1.5/1/1/1 (per expert, in the zoo's task order); no PEFT peers")
    ap.add_argument("--split", default="test", choices=["test", "validation"],
                    help="with --methods: score on these files (validation: to choose a scale, as the demo's were)")
    ap.add_argument("--no-eval", action="store_true", help="with --methods: merge time and memory only")
    ap.add_argument("--json", type=Path, default=None, help="with --methods: write the figures here")
    ap.add_argument("--merge-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.merge_child:
        return _merge_child(*args.merge_child)
    if args.methods:
        return _measure_methods(args)

    import torch
    from peft import PeftModel
    from rich.console import Console
    from rich.table import Table

    from _measure import open_zoo

    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.merge.adapter import merge_to_adapter
    from mergelab.recipe import load_recipe
    from mergelab.zoo.build import eval_options, evaluate_cached, expert_table
    from mergelab.zoo.demo import DEMO_MERGES, demo_recipe

    console = Console()
    t_all = time.perf_counter()
    zoo = open_zoo(args.zoo, args.device, console)
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


def _recipe(zoo, known: dict, spec: str) -> dict:
    """The demo's recipe for ``spec``: a merge's label, optionally ``:key=value+key=value…`` — method
    parameters (numbers, or ``first/…/last``: a list interpolated linearly over the layers), or
    ``weights=w1/w2/…``, one weight per expert in the zoo's task order."""
    from mergelab.zoo.demo import demo_recipe

    label, _, changes = spec.partition(":")
    recipe = demo_recipe(zoo, known[label])
    for change in filter(None, changes.split("+")):
        key, sep, value = change.partition("=")
        if not sep:
            raise SystemExit(f"{spec}: '{change}' is not key=value")
        if key == "weights":
            weights = [float(w) for w in value.split("/")]
            if len(weights) != len(recipe["experts"]):
                raise SystemExit(f"{spec}: {len(weights)} weights for {len(recipe['experts'])} experts")
            for expert, w in zip(recipe["experts"], weights):
                expert["weight"] = w
        else:   # ``a/b/…``: a per-layer list, interpolated over the layers (``lambda=1.5/3``: LiNeS)
            values = [float(v) for v in value.split("/")]
            recipe["method"][key] = values[0] if len(values) == 1 else values
    return recipe


def _measure_methods(args) -> int:
    """``--methods``: the named mergelab merges, each in a child process, scored on every task."""
    import json

    import torch
    from rich.console import Console
    from rich.table import Table

    from _measure import load_text, open_zoo

    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.run.report import below_base
    from mergelab.zoo.build import eval_options, evaluate_cached, expert_table
    from mergelab.zoo.demo import DEMO_MERGES, MORE_MERGES

    console = Console()
    known = {m.label: m for m in (*DEMO_MERGES, *MORE_MERGES)}
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "nuslerp" in wanted:
        console.print("nuslerp left out: it takes exactly two experts, the zoo has six")
        wanted.remove("nuslerp")
    unknown = [m for m in wanted if m.split(":")[0] not in known]
    if unknown:
        raise SystemExit(f"unknown merge(s): {', '.join(unknown)}; choose from {', '.join(known)}")
    t_all = time.perf_counter()
    console.print(f"load average at start {load_text()}")
    zoo = open_zoo(args.zoo, args.device, console)
    if args.no_eval:   # merge time and memory only (a merge takes seconds, its evaluation minutes)
        figures = {}
        with tempfile.TemporaryDirectory() as tmp:
            for label in wanted:
                load0 = load_text()
                figures[label] = fig = _merge_in_child(_recipe(zoo, known, label), Path(tmp) / label, args.device)
                console.print(f"  {label:12} merge {fig['merge_s']:.1f} s (CPU {fig['cpu_s']:.0f} s), peak RSS "
                              f"{fig['peak_rss_mb']:.0f} MiB (+{fig['peak_rss_mb'] - fig['rss_after_imports_mb']:.0f}"
                              f" over imports), load {load0} → {load_text()}", highlight=False)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1) + "\n")
        return 0
    model, tok = load_model_and_tokenizer(zoo.base, device=args.device, dtype="float32")
    base, expert = expert_table(model, tok, zoo, device=args.device, console=console, split=args.split)
    options = eval_options(args.device)
    names = list(zoo.tasks)
    files = {t: zoo.data(t, args.split) for t in names}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in wanted:
            recipe = _recipe(zoo, known, label)
            load0 = load_text()
            try:
                fig = _merge_in_child(recipe, Path(tmp) / label, args.device)
            except SystemExit as e:   # one failing merge does not lose the others' figures
                console.print(f"  {label}: merge failed: {e}", highlight=False, markup=False)
                continue
            t0 = time.perf_counter()
            scores, _ = evaluate_cached(model, tok, zoo, files, adapter=Path(tmp) / label, options=options,
                                        cache=None)
            norm = {t: scores[t] / expert[t] for t in names if expert[t] > 0}
            rows.append({"label": label, "method": recipe["method"], "scores": scores, "norm": norm,
                         "mean_norm": sum(norm.values()) / len(norm), "below": below_base(scores, base),
                         "eval_s": time.perf_counter() - t0, "load": f"{load0} → {load_text()}", **fig})
            r = rows[-1]
            console.print(f"  {label:12} normalised {r['mean_norm']:.1%}  below base: {', '.join(r['below']) or '–'}  "
                          f"merge {r['merge_s']:.1f} s (CPU {r['cpu_s']:.0f} s), peak RSS {r['peak_rss_mb']:.0f} MiB "
                          f"(+{r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f} over imports), eval {r['eval_s']:.0f} s, "
                          f"load {r['load']}", highlight=False)
            if args.json:   # after every merge: a run cut short keeps what it measured
                args.json.write_text(json.dumps({"base": base, "expert": expert, "rows": rows}, indent=1) + "\n")

    table = Table(title=f"Merge quality, SmolLM2-135M zoo ({args.split} files): normalised score = merged ÷ expert",
                  title_justify="left")
    table.add_column("merge", no_wrap=True)
    for t in names:
        table.add_column(t[:5], justify="right")
    for c in ("normalised", "below base", "merge s", "CPU s", "peak RSS MiB", "+ over imports"):
        table.add_column(c, justify="right")
    table.add_row("base (score)", *[f"{base[t]:.2f}" for t in names], "", "", "", "", "", "")
    table.add_row("experts (score)", *[f"{expert[t]:.2f}" for t in names], "100%", "", "", "", "", "",
                  end_section=True)
    for r in rows:
        table.add_row(r["label"], *[f"{r['scores'][t]:.2f}" + ("▼" if t in r["below"] else "") for t in names],
                      f"{r['mean_norm']:.1%}", str(len(r["below"])), f"{r['merge_s']:.1f}", f"{r['cpu_s']:.0f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f}")
    console.print(table)
    console.print("▼ below the base model's score on that task")
    console.print(f"total {time.perf_counter() - t_all:.0f} s; device {next(model.parameters()).device}; "
                  f"torch threads {torch.get_num_threads()}; load average at end {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
