"""``report.html`` of a run folder: one static page to look at after ``mergelab run``.

The recipe, the rule check, planned vs measured time per stage (planned when the run had a
budget), the scores per evaluation file (task) with a chart — against the base and the experts
when the caller knows their scores (a run knows the base's with ``eval: {compare_base: true}``),
each task the merge leaves below the base marked ``▼`` — and the manifest's hashes,
folded away. Built from :mod:`mergelab.htmlpage`: no server, no CDN, no script. The page holds
timings, so it is volatile (:data:`mergelab.run.manifest.VOLATILE_FILES`): never hashed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from mergelab import htmlpage as h
from mergelab.util import atomic_write

REPORT_NAME = "report.html"


def _task(file_name: str) -> str:
    return file_name[:-4] if file_name.endswith(".csv") else file_name


#: What a task scored below the base is marked with in tables (the terminal, report.md, report.html).
BELOW_MARK = "▼"


def below_base(merged: Mapping[str, float | None], base: Mapping[str, float | None]) -> list[str]:
    """The tasks of ``merged`` (in its order) where the merge scores below the base: for those,
    merging is worse than not merging at all. A task without a score on either side is left out."""
    return [t for t, v in merged.items() if v is not None and base.get(t) is not None and v < base[t]]


def read_scores(out_dir: Path) -> dict | None:
    """``eval/scores.json`` of a run folder, or None when the run did not evaluate."""
    path = Path(out_dir) / "eval" / "scores.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stage_section(manifest: Mapping[str, Any], stages: Sequence[Mapping[str, Any]] | None) -> str:
    """Planned vs measured seconds per stage (a table and a chart)."""
    measured = dict(manifest.get("timings") or {})
    budget = manifest.get("budget") or {}
    planned = dict(budget.get("planned") or {})
    names: list[str] = [s["name"] for s in stages or []]
    names += [n for n in [*measured, *planned] if n not in names]
    info = {s["name"]: s for s in stages or []}
    rows = []
    for n in names:
        s = info.get(n, {})
        rows.append([n, s.get("status", "ran" if n in measured else "–"),
                     h.fmt_seconds(planned.get(n)) if planned else None, h.fmt_seconds(measured.get(n)),
                     s.get("detail", "")])
    headers = ["stage", "status", "planned", "measured", "detail"]
    if not planned:
        headers.pop(2)
        rows = [r[:2] + r[3:] for r in rows]
    parts = [h.table(headers, rows, id="stages")]
    timed = [n for n in names if n in measured or n in planned]
    if timed:
        series = {"measured": [measured.get(n) for n in timed]}
        if planned:
            series = {"planned": [planned.get(n) for n in timed], **series}
        parts.append(h.bar_chart(timed, series, title="time per stage (s)", y_label="seconds",
                                 colours={"planned": h.GREY, "measured": h.PALETTE[0]}, value_format="{:.1f}",
                                 id="timechart"))
    if budget:
        parts.append(h.para(f"budget {h.fmt_seconds(budget.get('budget_s'))} on the {budget.get('hardware')}: "
                            f"planned {h.fmt_seconds(budget.get('planned_s'))} ({budget.get('plan_verdict', '')}); "
                            f"used {h.fmt_seconds(budget.get('used_s'))} on this machine"
                            + (" — OVER BUDGET" if budget.get("over_budget") else ""),
                            "bad" if budget.get("over_budget") else ""))
    else:
        parts.append(h.para("no budget was given (mergelab run --budget 60m plans each stage and "
                            "shows planned against measured time here)."))
    return h.section("Stages: planned and measured time", *parts, id="time")


def scores_section(scores: Mapping[str, Any] | None,
                   reference: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Per-task scores of the merge (and of the base and experts when ``reference`` names them)."""
    if not scores:
        return h.section("Scores", h.para("this run did not evaluate (no eval: section in the recipe)."),
                         id="scores")
    files = scores.get("files", {})
    tasks = [_task(f) for f in files]
    reference = {k: v for k, v in (reference or {}).items() if v}
    base = reference.get("base")
    merged = {_task(f): s["score"] for f, s in files.items()}
    below = below_base(merged, base) if base else []
    headers = ["task", "rows", "score (merge)", *[f"score ({k})" for k in reference],
               *(["merge − base"] if base else []), "MC accuracy", "exact match", "rows not reached"]
    rows = []
    for f, s in files.items():
        t = _task(f)
        vs_base = []
        if base:
            diff = None if s["score"] is None or base.get(t) is None else s["score"] - base[t]
            vs_base = [h.Cell(diff, "bad", f" {BELOW_MARK} below base", "the merge scores below the base model here")
                       if t in below else diff]
        rows.append([t, s["rows"], s["score"], *[ref.get(t) for ref in reference.values()], *vs_base,
                     s["multiple_choice"]["accuracy"], s["generation"]["exact_match"], s["not_reached"]])
    o = scores.get("overall", {})
    if o:
        rows.append(["overall", o["rows"], o["score"],
                     *[(sum(ref[t] for t in tasks) / len(tasks)) if all(ref.get(t) is not None for t in tasks)
                       else None for ref in reference.values()], *([None] if base else []),
                     o["multiple_choice"]["accuracy"], o["generation"]["exact_match"], o["not_reached"]])
    series: dict[str, list[float | None]] = {}
    colours = {"merge": h.PALETTE[0]}
    for i, (k, ref) in enumerate(reference.items()):
        series[k] = [ref.get(t) for t in tasks]
        colours[k] = h.GREY if k == "base" else h.PALETTE[(i + 1) % len(h.PALETTE)]
    series["merge"] = [files[f]["score"] for f in files]
    parts = [h.table(headers, rows, id="scoretable",
                     row_classes=["bad" if t in below else "" for t in tasks] + ["best"]),
             h.bar_chart(tasks, series, title="score per task", y_label="score", colours=colours, id="scorechart")]
    if below:
        parts.append(h.para(f"{BELOW_MARK} below the base model on "
                            + ", ".join(f"{t} ({merged[t]:.4f} < {base[t]:.4f})" for t in below)
                            + ": merging is worse there than not merging at all.", "bad"))
    elif base:
        parts.append(h.para("No task scores below the base model.", "ok"))
    if not reference:
        parts.append(h.para("Only the merge's own scores are known to this run; eval: {compare_base: true} in the "
                            "recipe scores the base on the same files too and flags each task the merge leaves "
                            "below it (mergelab eval of each expert gives their figures)."))
    if not scores.get("complete", True):
        parts.append(h.para("the evaluation did not finish: rows not reached got the fallback prediction.", "bad"))
    return h.section("Scores", *parts, id="scores")


def rules_section(rules: Any) -> str:
    if not isinstance(rules, Mapping):
        return h.section("Rule check", h.para(str(rules) if rules else "not checked", "warn"),
                         id="rules")
    verdict = h.para(f"{'PASS' if rules.get('ok') else 'FAIL'}: cut-off {rules.get('cutoff')}, at most "
                     f"{rules.get('max_params', 0) / 1e9:g}B parameters", "ok" if rules.get("ok") else "bad")
    rows = [[f.get("model"), f.get("role"), f.get("rule"), f.get("status"), f.get("reason")]
            for f in rules.get("findings", [])]
    return h.section("Rule check", verdict, h.table(["model", "role", "rule", "status", "reason"], rows),
                     id="rules")


def hashes_section(manifest: Mapping[str, Any]) -> str:
    outputs = manifest.get("outputs", {})
    inputs = [[m.get("role"), m.get("commit_sha") or m.get("local_path", ""), name, digest]
              for m in manifest.get("models", []) for name, digest in m.get("files", {}).items()]
    versions = manifest.get("versions", {})
    return h.section(
        "Reproducibility",
        "<p><code>mergelab reproduce manifest.json --out DIR2</code> runs this again and names every file "
        "whose bytes differ.</p>",
        h.details(f"output files and their sha256 ({len(outputs)})",
                  h.table(["file", "sha256"], [[k, v] for k, v in outputs.items()], id="outputs")),
        h.details(f"input files and their sha256 ({len(inputs)})",
                  h.table(["model", "commit / folder", "file", "sha256"], inputs)),
        h.details("versions and device",
                  h.table(["package", "version"], [[k, v] for k, v in versions.items()]),
                  h.pre(json.dumps(manifest.get("device", {}), indent=2))),
        id="hashes")


def run_report_html(manifest: Mapping[str, Any], *, stages: Sequence[Mapping[str, Any]] | None = None,
                    scores: Mapping[str, Any] | None = None,
                    reference: Mapping[str, Mapping[str, float]] | None = None, title: str = "mergelab run") -> str:
    """The page of one run from its manifest, its stage reports (``name``, ``status``, ``seconds``,
    ``detail``), its ``eval/scores.json`` and optional reference scores ``{"base": {task: score},
    "experts": {task: score}}``."""
    if reference is None and isinstance(manifest.get("base_scores"), Mapping):   # eval: {compare_base: true}
        reference = {"base": manifest["base_scores"]}
    recipe = manifest.get("recipe", {})
    method = recipe.get("method", {})
    n_experts = len(recipe.get("experts", []))
    sub = (f"{method.get('name', '?')} of {n_experts} expert(s) into a {recipe.get('output', {}).get('format', 'full')} "
           f"output · seed {manifest.get('seed')} · mergelab {manifest.get('versions', {}).get('mergelab', '?')}"
           f" · written {manifest.get('created', '')}")
    parts = []
    if manifest.get("warnings"):
        parts.append(h.section("Warnings", *[h.para(w, "bad") for w in manifest["warnings"]], id="warnings"))
    parts += [scores_section(scores, reference), stage_section(manifest, stages), rules_section(manifest.get("rules")),
              h.section("Recipe (normalised: Hub revisions pinned to commits)",
                        h.pre(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)), id="recipe"),
              hashes_section(manifest)]
    return h.page(title, parts, subtitle=sub)


def write_run_report(out_dir: str | Path, manifest: Mapping[str, Any], *,
                     stages: Sequence[Mapping[str, Any]] | None = None,
                     reference: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Write ``out_dir/report.html`` (see :func:`run_report_html`); returns its path."""
    out_dir = Path(out_dir)
    path = out_dir / REPORT_NAME
    atomic_write(path, run_report_html(manifest, stages=stages, scores=read_scores(out_dir), reference=reference,
                                       title=f"mergelab run: {out_dir.resolve().name}"))
    return path


__all__ = ["REPORT_NAME", "BELOW_MARK", "below_base", "run_report_html", "write_run_report", "read_scores"]
