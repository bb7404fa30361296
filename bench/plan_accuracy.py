"""How good is ``mergelab plan``? Estimate vs measured on this CPU, and the A6000 competition plan.

Part 1 — the SmolLM2 demo recipe on this machine:

1. a run recipe: base = the converted SmolLM2-135M-Instruct (``mergelab.zoo.base.ensure_base``),
   experts = the six LoRA adapters shipped in ``mergelab/zoo/adapters``, ``--method``
   (TIES by default, density 0.2 as in the demo; or task arithmetic, λ = 0.3) merged to a **full** model, ``eval:`` = the
   six zoo tasks' test CSVs (``mergelab.zoo.tasks``, written to a temporary folder; ``--rows``
   rows per task) with the zoo's evaluation options;
2. the plan with the library function behind ``mergelab plan --hardware cpu --calibrate``
   (:func:`mergelab.plan.plan_recipe` with ``calibrate_probe=True``);
3. the same recipe run for real with :func:`mergelab.run.run_recipe` (``rules=False``: the demo
   base is not competition-legal), taking the manifest's per-stage ``timings``;
4. a table: stage, estimated s, measured s, ratio (estimate ÷ measured).

Part 2 — the competition plan on the A6000 profile, from configs alone (no weights): Mistral-7B
(:func:`mergelab.plan.model_info_from_config`) + the 27 predibase LoRA adapters (r = 8 on q_proj
and v_proj, float32: 13.6 MB each) merged with TIES to a full bf16 model, evaluated on the 807-row
competition test file (``/work/shared/data/test.csv``, read in place for token counts when it
exists; otherwise a stand-in with the same row mix), with the margin to the hour. The Mistral
tokenizer is not available offline: the SmolLM2 tokenizer stands in for the token counts.

    python bench/plan_accuracy.py [--rows 40] [--method task_arithmetic|ties] [--threads 1] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mergelab.zoo.demo import DEMO_MERGES

COMPETITION_TEST = Path("/work/shared/data/test.csv")

# Mistral-7B-v0.1 config.json (the fields the planner reads).
MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "vocab_size": 32000,
              "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
# predibase/* Mistral-7B LoRA adapters: r = 8 on q_proj and v_proj, float32 safetensors.
PREDIBASE = {"count": 27, "rank": 8, "modules": {"q_proj": (4096, 4096), "v_proj": (4096, 1024)}, "dtype_bytes": 4}

# the demo's method sections (its scales: task arithmetic λ = 0.3, TIES density 0.2)
METHODS = {m.label: m.method for m in DEMO_MERGES if m.label in ("task_arithmetic", "ties")}


def demo_recipe(base: Path, adapters: list[Path], method: str, test_files: list[Path]) -> dict:
    from mergelab.zoo.build import eval_options

    opts = eval_options("auto").model_dump(exclude={"device"}, exclude_defaults=True)
    return {"base": {"path": str(base)}, "experts": [{"path": str(a)} for a in adapters],
            "method": dict(METHODS[method]), "output": {"format": "full"}, "seed": 0,
            "eval": {"data": [str(f) for f in test_files], **opts}}


def part1(args, work: Path) -> dict[str, float]:
    """Plan, run, print the table; returns the ratio estimate ÷ measured per planned stage."""
    from mergelab.commands.plan import print_plan
    from mergelab.plan import plan_recipe
    from mergelab.run.pipeline import run_recipe
    from mergelab.zoo.base import ensure_base
    from mergelab.zoo.build import PACKAGED_ADAPTERS
    from mergelab.zoo.tasks import TASKS, write_all
    from rich.console import Console

    base = ensure_base()
    tasks = list(TASKS)
    adapters = [PACKAGED_ADAPTERS / t for t in tasks]
    csvs = write_all(work / "data", seed=0, sizes={"train": 1, "validation": 1, "test": args.rows})
    test_files = []
    for t in tasks:   # one folder, one name per task: the evaluator names submissions after the files
        test_files.append(work / "eval-data" / f"{t}.csv")
        test_files[-1].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(csvs[t]["test"], test_files[-1])
    recipe = demo_recipe(base, adapters, args.method, test_files)
    print(f"recipe: base {base}; {len(adapters)} shipped adapters ({', '.join(tasks)}); method {recipe['method']}; "
          f"output full; eval on {len(test_files)} test CSVs × {args.rows} rows "
          f"({'the full test split' if args.rows >= 40 else 'a subset of the 40-row test split'})")

    t0 = time.perf_counter()
    plan = plan_recipe(recipe, hardware="cpu", budget="60m", calibrate_probe=True, base_dir=work)
    t_plan = time.perf_counter() - t0
    print_plan(plan, Console(file=sys.stdout, width=180))
    print(f"(planning with calibration took {t_plan:.1f} s)")

    print("running the recipe for real (run_recipe, rules=False)…")
    t0 = time.perf_counter()
    result = run_recipe(recipe, work / "run", device="cpu", rules=False)
    t_run = time.perf_counter() - t0
    manifest = result.manifest if hasattr(result, "manifest") else None
    if manifest is None:
        import json

        manifest = json.loads((work / "run" / "manifest.json").read_text())
    timings = manifest["timings"]

    print(f"\nestimate vs measured on this CPU ({plan.probe['device']}, {plan.probe['threads']} threads), "
          f"{args.rows} rows per task × {len(tasks)} tasks")
    print(f"{'stage':<10}{'estimated s':>13}{'measured s':>12}{'ratio est/meas':>16}   estimate's terms (s)")
    est_total = meas_total = 0.0
    ratios = {}
    for s in plan.stages:
        m = timings.get(s.name)
        if m:
            ratios[s.name] = s.seconds / m
        est_total += s.seconds
        if m is not None:
            meas_total += m
        ratio = f"{s.seconds / m:.2f}×" if m else "n/a"
        terms = ", ".join(f"{k} {v:.2f}" for k, v in s.parts.items())
        print(f"{s.name:<10}{s.seconds:>13.2f}{(m if m is not None else float('nan')):>12.2f}{ratio:>16}   {terms}")
    others = {k: v for k, v in timings.items() if k not in {s.name for s in plan.stages}}
    for k, v in others.items():
        print(f"{k:<10}{'(not planned)':>13}{v:>12.2f}{'':>16}")
    print(f"{'total':<10}{est_total:>13.2f}{meas_total:>12.2f}{est_total / meas_total:>15.2f}×   "
          f"(planned stages only; whole run_recipe call {t_run:.1f} s)")
    w = plan.workload or {}
    if w:
        print(f"eval workload: {w['rows_mc']} multiple-choice + {w['rows_gen']} generation rows, "
              f"{w['batches_mc']} + {w['batches_gen']} batches, max_new_tokens {w['max_new_tokens']} "
              f"(the estimate decodes every generation batch to max_new_tokens; the run stops at the first newline)")
    return ratios


def predibase_adapter(base):
    """One predibase adapter's sizes (from its adapter config: r, target modules, float32)."""
    r = PREDIBASE["rank"]
    per_layer = sum(r * (i + o) for i, o in PREDIBASE["modules"].values())
    params = per_layer * base.layers
    return replace(base, path="predibase adapter (r=8, q_proj+v_proj)", params=params,
                   bytes=params * PREDIBASE["dtype_bytes"], tensors=2 * len(PREDIBASE["modules"]) * base.layers,
                   adapter=True)


def part2(args, ratios: dict[str, float] | None = None) -> None:
    from mergelab.evaluate import EvalOptions
    from mergelab.plan import (EvalWorkload, Plan, estimate_eval, estimate_merge, eval_workload, fmt_bytes,
                               get_profile, model_info_from_config)
    from mergelab.zoo.base import ensure_base

    hw = get_profile("a6000")
    mistral = model_info_from_config(MISTRAL_7B, dtype_bytes=2, name="Mistral-7B-v0.1")
    adapter = predibase_adapter(mistral)
    experts = [adapter] * PREDIBASE["count"]
    print(f"\nA6000 plan: {mistral.path} ({mistral.params:,} parameters, {fmt_bytes(mistral.bytes)} bf16, from its config) "
          f"+ {len(experts)} predibase adapters ({fmt_bytes(adapter.bytes)} each), TIES → full bf16 model")
    if COMPETITION_TEST.is_file():
        source = f"{COMPETITION_TEST} (read in place; SmolLM2 tokenizer as a stand-in for Mistral's)"
        workloads = {n: eval_workload(ensure_base(), [COMPETITION_TEST], EvalOptions(batch_size=16, max_new_tokens=n))
                     for n in args.a6000_max_new_tokens}
    else:
        # Stand-in with the competition file's row mix (457 multiple choice, 350 generation) and
        # prompt lengths of the order measured on it (docs/budget.md).
        source = "a stand-in (the competition file is not at hand): 457 MC + 350 generation rows, 120 + 60 prompt tokens"
        workloads = {}
        for n in args.a6000_max_new_tokens:
            workloads[n] = EvalWorkload(rows_mc=457, rows_gen=350, prompt_tokens_mc=457 * 120, choice_tokens=457 * 4 * 3,
                                        prompt_tokens_gen=350 * 60, max_new_tokens=n, batches_mc=29, batches_gen=22,
                                        longest=512 + n)
    print(f"evaluation set: {source}")
    merge = estimate_merge(hw, mistral, experts, "ties", 2)
    ta = estimate_merge(hw, mistral, experts, "task_arithmetic", 2)
    print(f"merge with task arithmetic instead of TIES: {ta.seconds:.1f} s "
          "(no top-k selection; " + ", ".join(f"{k} {v:.1f}" for k, v in ta.parts.items()) + ")")
    for n, w in workloads.items():
        ev = estimate_eval(hw, mistral, w)
        plan = Plan(hw, 3600.0, [merge, ev], {})
        print(f"\n  max_new_tokens {n}: {w.rows_mc} MC + {w.rows_gen} generation rows, "
              f"{w.prompt_tokens_mc + w.choice_tokens + w.prompt_tokens_gen} prefill tokens, batch 16")
        print(f"  {'stage':<8}{'estimate':>10}{'peak memory':>13}   terms (s)")
        for s in plan.stages:
            print(f"  {s.name:<8}{s.seconds:>9.1f}s{fmt_bytes(s.peak_memory):>13}   "
                  + ", ".join(f"{k} {v:.1f}" for k, v in s.parts.items()))
        print(f"  total   {plan.total_s:>9.1f}s   margin to the hour: {(3600 - plan.total_s) / 60:.1f} min")
        print(f"  verdict: {plan.verdict}")
        if ratios:
            # A stress test, not a prediction: CPU ratios need not carry over to a GPU.
            # The merge ratio applies only when part 1 merged with TIES too (the A6000 plan's method).
            usable = {k: v for k, v in ratios.items() if k != "merge" or args.method == "ties"}
            stressed = sum(st.seconds / usable.get(st.name, 1.0) for st in plan.stages)
            print(f"  stress test, each stage ÷ this CPU run's est/meas ratio "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in usable.items())}): "
                  f"{stressed:.0f} s, margin {(3600 - stressed) / 60:.1f} min")
    print("\nThe A6000 figures are datasheet peaks × mergelab's efficiency guesses (hardware.yaml), not measured "
          "on an A6000; download time is not included (models must be cached before the clock starts).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=40, help="test rows per zoo task (40 = the whole test split)")
    ap.add_argument("--method", choices=sorted(METHODS), default="ties",
                    help="merge method of the demo recipe (default ties, the A6000 plan's method)")
    ap.add_argument("--keep", type=Path, help="keep the work folder here instead of a temporary one")
    ap.add_argument("--skip-run", action="store_true", help="only part 2 (the A6000 plan)")
    ap.add_argument("--a6000-max-new-tokens", type=int, nargs="+", default=[64, 256],
                    help="generation lengths to plan the competition evaluation for")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the probe and the run (default 1: on a shared 2-core machine two "
                         "threads contend with other processes and a forward call slows ~20×)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()} (probe and run alike)")
    t_start = time.perf_counter()
    ratios = None
    if not args.skip_run:
        work = args.keep or Path(tempfile.mkdtemp(prefix="mergelab-plan-accuracy-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            ratios = part1(args, work)
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
    part2(args, ratios)
    print(f"\nwhole benchmark: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
