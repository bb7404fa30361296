"""``mergelab run``: recipe → resolved models → (rule check) → merge → evaluation → submission.

A run writes into one folder::

    DIR/model/          the merged model (format: full) or the merged adapter (format: lora)
    DIR/finetune/       with a ``finetune:`` section: the trained LoRA adapter (PEFT layout)
    DIR/merged/         with ``finetune: {when: after_merge}``: the merge before fine-tuning;
                        model/ is then this model with the trained adapter folded in
    DIR/eval/X.csv      submission file for each evaluation file X.csv (with eval/scores.json,
                        eval/predictions/X.jsonl)
    DIR/timing.json     stage timings of the last invocation (volatile: not hashed)
    DIR/manifest.json   normalised recipe, resolved commits, input/output sha256, versions, seeds

Running again into the same folder skips a stage whose inputs (recipe section and input file
hashes) and outputs (file hashes) still match the manifest. :func:`reproduce` runs a manifest's
recipe again into a new folder and names every output file whose bytes differ.

With a budget (``mergelab run --budget 60m``) the recipe is planned first (:mod:`mergelab.plan`)
and refused when it does not fit; while it runs, fine-tuning and evaluation stop at the deadline
(see :func:`run_recipe`), and ``manifest["budget"]`` says what was planned and what was used.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import ValidationError

from mergelab import __version__
from mergelab.errors import RecipeError, ReproducibilityError
from mergelab.run.manifest import (MANIFEST_NAME, VOLATILE_FILES, device_info, fingerprint, hash_tree, now_iso, package_versions, read_manifest, write_manifest)
from mergelab.util import sha256_file
from mergelab.recipe import read_recipe
from mergelab.hub.sources import select_files, resolve_ref
from mergelab.recipe import Recipe
from mergelab.merge import merge
from mergelab.plan import get_profile, parse_budget, plan_run
from mergelab.finetune.train import check_data_licences, train_adapter
from mergelab.hub.rules import check_models, recipe_refs, RulesNotMetError
from mergelab.errors import BudgetError, OutputExistsError
from mergelab.evaluate.runner import evaluate

MODEL_DIR, EVAL_DIR = "model", "eval"
MERGED_DIR, FINETUNE_DIR = "merged", "finetune"   # only with a finetune: section


class OutputsDifferError(ReproducibilityError):
    """A reproduced run wrote different bytes (or read different inputs) than its manifest says."""

    exit_code = 1


@dataclass
class StageReport:
    name: str
    status: str          # "ran", "partial" (stopped by the deadline), "skipped" (up to date), "off"
    seconds: float = 0.0
    detail: str = ""


@dataclass
class RunResult:
    out_dir: Path
    manifest: dict
    stages: list[StageReport] = field(default_factory=list)
    plan: Any = None                      # the mergelab.plan.Plan of a run with a budget
    warnings: list[str] = field(default_factory=list)


def _input_files(folder: Path, listed: tuple[str, ...]) -> dict[str, str]:
    """sha256 of the files of a model folder that mergelab reads (weights, config, tokenizer, adapter)."""

    names = select_files(listed) if listed else []
    return {n: sha256_file(folder / n) for n in names if (folder / n).is_file()}


def _resolve(recipe, progress: Callable[[str], None]) -> tuple[Any, list[dict]]:
    """Resolve every model of the recipe; return the recipe pinned to commits, and the records."""

    records = []
    data = recipe.model_dump(mode="json", exclude_none=True)
    roles = [("base", recipe.base, data["base"])] + [
        (f"expert {i}", e, data["experts"][i - 1]) for i, e in enumerate(recipe.experts, 1)]
    for role, ref, entry in roles:
        progress(f"resolving {role}: {ref}")
        res = resolve_ref(ref)
        rec = res.to_dict()
        rec["role"] = role
        rec["files"] = _input_files(res.local_path, res.files)
        for f in getattr(ref, "data", None) or []:   # a data-aware method's inputs (regmean)
            rec["files"][f"data:{f}"] = sha256_file(f)
        records.append(rec)
        if res.source == "hub":   # pin: the normalised recipe names the commit, not a branch
            entry.pop("path", None)
            entry["revision"] = res.commit_sha
        else:
            entry["path"] = str(res.local_path)
    return Recipe.model_validate(data), records


def _local_recipe(recipe, records: list[dict]):
    """The recipe with every model as a local folder (what the engine reads)."""

    data = recipe.model_dump(mode="json", exclude_none=True)
    entries = [data["base"], *data["experts"]]
    for entry, rec in zip(entries, records):
        entry.pop("model", None)
        entry.pop("revision", None)
        entry["path"] = rec["local_path"]
    return Recipe.model_validate(data)


def _stage_key(*parts: Any) -> str:
    return fingerprint({"mergelab": __version__, "parts": parts})


def _up_to_date(previous: dict | None, name: str, key: str, folder: Path) -> bool:
    stage = (previous or {}).get("stages", {}).get(name)
    return bool(stage and stage.get("key") == key and stage.get("complete", True) and folder.is_dir()
                and hash_tree(folder, skip=VOLATILE_FILES) == stage.get("outputs"))


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def run_recipe(recipe_path: str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike, *,
               device: str = "auto", rules: bool = True, cutoff: str | None = None,
               progress: Callable[[str], None] | None = None, quiet: bool = True,
               budget: float | str | None = None, hardware: str = "a6000", force: bool = False,
               warn: Callable[[str], None] | None = None) -> RunResult:
    """Run a recipe into ``out_dir``: resolve, check the rules, (fine-tune,) merge, (fine-tune,
    fold,) evaluate; write the manifest.

    ``recipe_path`` is a recipe file or an already-read dict (paths then count from the current
    folder). With ``rules`` the competition rule check (models and fine-tuning data licences)
    must pass before anything is merged.

    ``budget`` (seconds or ``"60m"``): the recipe is planned on ``hardware``
    (:mod:`mergelab.plan`) and refused with :class:`BudgetError` when the plan does not fit,
    unless ``force``; while running, the clock is enforced: fine-tuning stops early to leave the
    later stages their planned time, and evaluation stops at the deadline, filling the rows not
    reached with the documented fallback (the submission stays complete).
    ``manifest["budget"]`` records planned and used seconds and the rows not reached.
    """

    t_run = time.monotonic()
    say = progress or (lambda msg: None)
    warn = warn or say
    out_dir = Path(out_dir)
    doc = read_recipe(recipe_path)
    recipe, finetune, eval_section, root = doc.recipe, doc.finetune, doc.eval, doc.root
    if recipe.eval and eval_section is None:
        raise RecipeError(f"{doc.label}: eval.data: list the competition CSV files to evaluate on (got nothing)",
                          hint="e.g. eval: {data: [test.csv], batch_size: 16}")
    budget_s = None
    if budget is not None:
        budget_s = parse_budget(budget)
        profile = get_profile(hardware)
    deadline = t_run + budget_s if budget_s is not None else None
    previous = None
    if (out_dir / MANIFEST_NAME).is_file():
        try:
            previous = read_manifest(out_dir / MANIFEST_NAME)
        except ReproducibilityError:
            previous = None
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise OutputExistsError(f"{out_dir} exists and is not a mergelab run folder (no {MANIFEST_NAME})",
                                hint="choose a new --out folder, or empty this one")

    stages: list[StageReport] = []
    timings: dict[str, float] = {}
    warnings_: list[str] = []

    def loud(msg: str) -> None:
        warnings_.append(msg)
        warn(msg)

    # 0. fine-tuning data licences (before anything is read or written)
    data_records = None
    if finetune is not None:
        data_records = check_data_licences(finetune, rules=rules, warn=loud)

    # 1. resolve
    t0 = time.perf_counter()
    pinned, models = _resolve(recipe, say)
    timings["resolve"] = time.perf_counter() - t0
    stages.append(StageReport("resolve", "ran", timings["resolve"], f"{len(models)} model(s)"))

    # 2. rules
    rule_report = None
    if rules:
        say("checking the competition rules")
        t0 = time.perf_counter()
        rule_report = check_models(recipe_refs(pinned), cutoff=cutoff)
        timings["rules"] = time.perf_counter() - t0
        stages.append(StageReport("rules", "ran", timings["rules"],
                                  "pass" if rule_report.ok else f"{len(rule_report.failures)} failure(s)"))
        if not rule_report.ok:
            failed = sorted({f"{f.model} [{f.rule}]" for f in rule_report.failures})
            raise RulesNotMetError(
                f"the recipe does not meet the competition rules: {', '.join(failed)}",
                hint="`mergelab check RECIPE` shows each reason; fix the recipe, or pass --no-rules for a "
                     "run outside the competition")
    else:
        stages.append(StageReport("rules", "off", 0.0, "--no-rules"))

    # 3. the budget plan
    plan = None
    if budget_s is not None:
        say(f"planning on the {profile.name} against a budget of {budget_s / 60:.1f} min")
        plan = plan_run(recipe, finetune, eval_section, Path(models[0]["local_path"]),
                        [Path(m["local_path"]) for m in models[1:]], profile, budget_s)
        if not plan.fits:
            if not force:
                raise BudgetError(f"the plan on the {profile.name} {plan.verdict}",
                                  hint="`mergelab plan RECIPE` shows each stage; shrink the recipe, raise "
                                       "--budget, or pass --force to run with the deadline enforced")
            loud(f"--force: running although the plan on the {profile.name} {plan.verdict}")
        else:
            say(plan.verdict)
    out_dir.mkdir(parents=True, exist_ok=True)

    def time_left_for(stage: str) -> float | None:
        """The deadline of ``stage``: the run's, less the planned time of the stages after it."""
        if deadline is None:   # no budget (with one, there is always a plan)
            return None
        names = [s.name for s in plan.stages]
        later = names[names.index(stage) + 1:] if stage in names else []
        return deadline - sum(plan.stage(n).seconds for n in later)

    inputs = {m["role"]: m["files"] for m in models}
    normalised = pinned.model_dump(mode="json", exclude_none=True)
    if eval_section is not None:
        normalised["eval"] = {"data": [str(p) for p in eval_section.data], **eval_section.options}
    if finetune is not None:
        normalised["finetune"] = finetune.model_dump(mode="json")
    stage_records: dict[str, dict] = {}

    def finetune_stage(model_path: Path, model_hashes: Any) -> None:
        ft_dir = out_dir / FINETUNE_DIR
        key = _stage_key(normalised["finetune"], [r["sha256"] for r in data_records], model_hashes)
        if _up_to_date(previous, "finetune", key, ft_dir):
            stages.append(StageReport("finetune", "skipped", 0.0, "inputs and outputs match the manifest"))
            stage_records["finetune"] = previous["stages"]["finetune"]
            return

        say(f"fine-tuning a LoRA adapter ({finetune.when}, {finetune.steps} steps)")
        tmp = _atomic_dir(ft_dir)
        try:
            res = train_adapter(model_path, finetune, tmp, device=device, deadline=time_left_for("finetune"))
            _replace_dir(tmp, ft_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        timings["finetune"] = res.seconds
        detail = f"{res.steps_done}/{res.steps} steps, loss {res.losses[0]:.3f} → {res.losses[-1]:.3f}"
        if res.stopped_by_deadline:
            detail = "DEADLINE: stopped early, " + detail
            loud(f"fine-tuning stopped by the deadline after {res.steps_done} of {res.steps} steps")
        stages.append(StageReport("finetune", "partial" if res.stopped_by_deadline else "ran", res.seconds, detail))
        stage_records["finetune"] = {"key": key, "outputs": hash_tree(ft_dir, skip=VOLATILE_FILES),
                                     "seconds": res.seconds, "data": data_records, "seed": finetune.seed,
                                     "steps_done": res.steps_done, "losses": res.losses,
                                     "complete": res.complete}

    # 4. fine-tune before merging: an adapter on the base, merged as one more expert
    merge_recipe = _local_recipe(pinned, models)
    if finetune is not None and finetune.when == "before_merge":
        finetune_stage(Path(models[0]["local_path"]), inputs["base"])
        data = merge_recipe.model_dump(mode="json", exclude_none=True)
        data["experts"].append({"path": str(out_dir / FINETUNE_DIR), **finetune.expert})

        try:
            merge_recipe = Recipe.model_validate(data)
        except (ValidationError, RecipeError) as exc:
            raise RecipeError(f"finetune: the trained adapter cannot join the merge as an expert ({exc})",
                              hint="check finetune.expert against the method's per-expert parameters") from None

    # 5. merge
    after = finetune is not None and finetune.when == "after_merge"
    merged_dir = out_dir / (MERGED_DIR if after else MODEL_DIR)
    merge_part = {k: v for k, v in normalised.items() if k not in ("eval", "finetune")}
    extra = (stage_records["finetune"]["outputs"], normalised["finetune"]["expert"]) \
        if finetune is not None and not after else None
    merge_key = _stage_key(merge_part, inputs, *([extra] if extra else []))
    if _up_to_date(previous, "merge", merge_key, merged_dir):
        stages.append(StageReport("merge", "skipped", 0.0, "inputs and outputs match the manifest"))
        stage_records["merge"] = previous["stages"]["merge"]
    else:
        if deadline is not None and time.monotonic() > deadline:
            loud("the deadline passed before the merge; merging anyway so that a submission can be written")
        say(f"merging with {recipe.method.name}")
        t0 = time.perf_counter()
        result = merge(merge_recipe, merged_dir, device=device, force=True, progress=not quiet)
        timings["merge"] = time.perf_counter() - t0
        stages.append(StageReport("merge", "ran", timings["merge"], str(getattr(result, "method", ""))))
        stage_records["merge"] = {"key": merge_key, "outputs": hash_tree(merged_dir, skip=VOLATILE_FILES),
                                  "seconds": timings["merge"]}

    # 6. fine-tune after merging, then fold the adapter into the merged weights
    model_dir = out_dir / MODEL_DIR
    final_outputs = stage_records["merge"]["outputs"]
    if after:
        finetune_stage(merged_dir, stage_records["merge"]["outputs"])
        fold_key = _stage_key(stage_records["merge"]["outputs"], stage_records["finetune"]["outputs"],
                              normalised["output"])
        if _up_to_date(previous, "fold", fold_key, model_dir):
            stages.append(StageReport("fold", "skipped", 0.0, "inputs and outputs match the manifest"))
            stage_records["fold"] = previous["stages"]["fold"]
        else:
            say("folding the trained adapter into the merged model")
            t0 = time.perf_counter()
            fold = {"base": {"path": str(merged_dir)},
                    "experts": [{"path": str(out_dir / FINETUNE_DIR), "weight": 1.0}],
                    "method": {"name": "task_arithmetic"}, "output": normalised["output"]}
            merge(fold, model_dir, device=device, force=True, progress=not quiet)
            timings["fold"] = time.perf_counter() - t0
            stages.append(StageReport("fold", "ran", timings["fold"], "W + ΔW of the trained adapter"))
            stage_records["fold"] = {"key": fold_key, "outputs": hash_tree(model_dir, skip=VOLATILE_FILES),
                                     "seconds": timings["fold"]}
        final_outputs = stage_records["fold"]["outputs"]
    elif (out_dir / MERGED_DIR).exists():
        shutil.rmtree(out_dir / MERGED_DIR)
    if finetune is None and (out_dir / FINETUNE_DIR).exists():
        shutil.rmtree(out_dir / FINETUNE_DIR)

    # 7. evaluate
    eval_dir = out_dir / EVAL_DIR
    if eval_section is None:
        stages.append(StageReport("eval", "off", 0.0, "no eval section"))
        if eval_dir.exists():
            shutil.rmtree(eval_dir)
    else:
        data_hashes = {str(p): sha256_file(p) for p in eval_section.data}
        shots = eval_section.options.get("shots")
        if shots:
            data_hashes[str(shots)] = sha256_file(shots)
        eval_key = _stage_key(normalised["eval"], final_outputs, data_hashes,
                              inputs["base"] if recipe.output.format == "lora" else None)
        if _up_to_date(previous, "eval", eval_key, eval_dir):
            stages.append(StageReport("eval", "skipped", 0.0, "inputs and outputs match the manifest"))
            stage_records["eval"] = previous["stages"]["eval"]
        else:
            say(f"evaluating on {len(eval_section.data)} file(s)")
            t0 = time.perf_counter()
            options = eval_section.eval_options(device)
            if recipe.output.format == "lora":
                scores = evaluate(models[0]["local_path"], eval_section.data, eval_dir, options,
                                  adapter=model_dir, force=True, deadline=deadline,
                                  label="base + model/ (adapter)")
            else:
                scores = evaluate(model_dir, eval_section.data, eval_dir, options, force=True,
                                  deadline=deadline, label="model/")
            timings["eval"] = time.perf_counter() - t0
            overall = scores.get("overall", {})
            missed = int(overall.get("not_reached", 0) or 0)
            detail = ", ".join(f"{k}={v:.3f}" for k, v in overall.items() if isinstance(v, float))
            status = "ran"
            if not scores.get("complete", True):
                status = "partial"
                detail = (f"DEADLINE: {missed} of {overall.get('rows', missed)} rows not reached "
                          f"(fallback: choice 0 / empty text); " + detail)
                loud(f"evaluation hit the deadline: {missed} row(s) not reached got the fallback prediction; "
                     f"the submission files are complete but those rows are guesses")
            stages.append(StageReport("eval", status, timings["eval"], detail))
            stage_records["eval"] = {"key": eval_key, "outputs": hash_tree(eval_dir, skip=VOLATILE_FILES),
                                     "seconds": timings["eval"], "data": data_hashes,
                                     "complete": bool(scores.get("complete", True)), "rows_not_reached": missed}

    if budget_s is not None:
        used = time.monotonic() - t_run
        budget_record = {
            "budget_s": budget_s, "hardware": profile.name, "forced": bool(force) and not plan.fits,
            "planned_s": plan.total_s, "planned": {s.name: s.seconds for s in plan.stages},
            "plan_verdict": plan.verdict,
            "used_s": used, "used": dict(timings), "over_budget": used > budget_s,
            "eval_complete": stage_records.get("eval", {}).get("complete", True),
            "rows_not_reached": stage_records.get("eval", {}).get("rows_not_reached", 0),
        }
        finetuned = stage_records.get("finetune", {})
        if not finetuned.get("complete", True):
            budget_record["finetune_steps_done"] = finetuned["steps_done"]
        if used > budget_s:
            loud(f"the run took {used / 60:.1f} min, over the budget of {budget_s / 60:.1f} min")

    outputs = {f"{MODEL_DIR}/{k}": v for k, v in final_outputs.items()}
    if after:
        outputs |= {f"{MERGED_DIR}/{k}": v for k, v in stage_records["merge"]["outputs"].items()}
    if finetune is not None:
        outputs |= {f"{FINETUNE_DIR}/{k}": v for k, v in stage_records["finetune"]["outputs"].items()}
    outputs |= {f"{EVAL_DIR}/{k}": v for k, v in stage_records.get("eval", {}).get("outputs", {}).items()}
    manifest = {
        "mergelab_manifest": 1,
        "created": now_iso(),
        "recipe": normalised,
        "models": models,
        "seed": recipe.seed,
        "rules": rule_report.to_dict() if rule_report is not None else "not checked (--no-rules)",
        "versions": package_versions(),
        "device": device_info(device),
        "stages": stage_records,
        "timings": timings,
        "outputs": outputs,
    }
    if finetune is not None:
        manifest["finetune"] = {"when": finetune.when, "seed": finetune.seed, "data": data_records}
    if budget_s is not None:
        manifest["budget"] = budget_record
    if warnings_:
        manifest["warnings"] = warnings_
    (out_dir / "timing.json").write_text(json.dumps(timings, indent=2) + "\n")
    write_manifest(out_dir / MANIFEST_NAME, manifest)
    return RunResult(out_dir, manifest, stages, plan=plan, warnings=warnings_)


def reproduce(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, *, device: str = "auto",
              progress: Callable[[str], None] | None = None, quiet: bool = True) -> RunResult:
    """Run a manifest's recipe again into ``out_dir`` and compare every input and output hash.

    Raises :class:`OutputsDifferError` naming each input file that changed and each output file
    whose bytes differ (or that is missing / new).
    """
    old = read_manifest(manifest_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputExistsError(f"{out_dir} is not empty", hint="reproduce into a new folder")
    rules = isinstance(old.get("rules"), dict)
    result = run_recipe(old["recipe"], out_dir, device=device, rules=rules, progress=progress, quiet=quiet)
    # (a budget is not replayed: a reproduction runs every stage to the end)
    new = result.manifest
    problems = []
    old_inputs = {m["role"]: m["files"] for m in old.get("models", [])}
    for m in new["models"]:
        before = old_inputs.get(m["role"], {})
        for name in sorted(set(before) | set(m["files"])):
            if before.get(name) != m["files"].get(name):
                problems.append(f"input changed: {m['role']} {name}")
    a, b = old["outputs"], new["outputs"]
    for name in sorted(set(a) | set(b)):
        if name not in b:
            problems.append(f"missing output: {name}")
        elif name not in a:
            problems.append(f"new output: {name}")
        elif a[name] != b[name]:
            problems.append(f"differs: {name}")
    if problems:
        raise OutputsDifferError(
            f"the run does not reproduce {manifest_path} ({len(problems)} difference(s)):\n  "
            + "\n  ".join(problems),
            hint="on GPU, kernels may differ between cards and library versions; compare on CPU")
    return result


def load_run_recipe(source, *, base_dir=None):  # TODO(lead): plan/ calls read_recipe directly once merged
    doc = read_recipe(source, base_dir=base_dir)
    return doc.recipe, doc.finetune, doc.eval, doc.root
