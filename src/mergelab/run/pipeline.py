"""``mergelab run``: recipe → resolved models → (rule check) → merge → evaluation → submission.

A run writes into one folder::

    DIR/model/          the merged model (format: full) or the merged adapter (format: lora)
    DIR/finetune/       with a ``finetune:`` section: the trained LoRA adapter (PEFT layout)
    DIR/merged/         with ``finetune: {when: after_merge}``: the merge before fine-tuning;
                        model/ is then this model with the trained adapter folded in
    DIR/eval/X.csv      submission file for each evaluation file X.csv (with eval/scores.json,
                        eval/predictions/X.jsonl)
    DIR/timing.json     stage timings of the last invocation (volatile: not hashed)
    DIR/report.html     one static page: scores, chart, planned vs measured time, rules, hashes
                        (volatile: it holds timings; not hashed)
    DIR/manifest.json   normalised recipe, resolved commits, input/output sha256, versions, seeds;
                        with ``eval: {compare_base: true}`` the base's scores on the same files
                        (``base_scores``) and the tasks the merge leaves below them (``below_base``)

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import ValidationError

from mergelab import __version__
from mergelab.errors import RecipeError, ReproducibilityError
from mergelab.run.report import below_base, read_scores, write_run_report
from mergelab.run.manifest import (MANIFEST_NAME, VOLATILE_FILES, device_info, fingerprint, hash_tree, now_iso, package_versions, read_manifest, write_manifest)
from mergelab.util import check_output_path, remove_stale_temps, sha256_file
from mergelab.progress import ProgressBar, eval_columns
from mergelab.recipe import read_recipe
from mergelab.hub.sources import select_files, resolve_ref
from mergelab.recipe import Recipe
from mergelab.merge import merge
from mergelab.merge.card import CARD_NAME, CardInput, inputs_from_records, render_card, write_card
from mergelab.plan import get_profile, parse_budget, plan_run
from mergelab.finetune.train import check_data_licences, train_adapter
from mergelab.hub.rules import check_models, recipe_refs, recipe_stack
from mergelab.errors import BudgetError, OutputExistsError
from mergelab.evaluate.runner import evaluate
from mergelab.evaluate.data import read_competition_csv
from mergelab.errors import DataError

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
    roles = [("base", recipe.base, [data["base"]])] + [
        (f"expert {i}", e, [data["experts"][i - 1]]) for i, e in enumerate(recipe.experts, 1)]
    if recipe.slices is not None:   # a layer stack: each model once, pinned in every slice that names it
        entries: dict[tuple, list] = {}
        for ref, entry in zip(recipe.slices, data["slices"]):
            entries.setdefault(_ref_key(ref), []).append(entry)
        roles += [(role, ref, entries[_ref_key(ref)]) for role, ref in recipe.stack_models()]
    hashed: dict[str, dict] = {}   # a folder read in two roles (a stack's base and first slice) is hashed once
    for role, ref, pinned in roles:
        progress(f"resolving {role}: {ref}")
        res = resolve_ref(ref)
        rec = res.to_dict()
        rec["role"] = role
        folder = str(res.local_path)
        if folder not in hashed:
            hashed[folder] = _input_files(res.local_path, res.files)
        rec["files"] = dict(hashed[folder])
        for f in getattr(ref, "data", None) or []:   # a data-aware method's inputs (regmean)
            rec["files"][f"data:{f}"] = sha256_file(f)
        records.append(rec)
        for entry in pinned:
            if res.source == "hub":   # pin: the normalised recipe names the commit, not a branch
                entry.pop("path", None)
                entry["revision"] = res.commit_sha
            else:
                entry["path"] = str(res.local_path)
    return Recipe.model_validate(data), records


def _ref_key(ref) -> tuple:
    return (ref.path, ref.model, ref.revision)


def _local_recipe(recipe, records: list[dict]):
    """The recipe with every model as a local folder (what the engine reads)."""

    data = recipe.model_dump(mode="json", exclude_none=True)
    entries = [data["base"], *data["experts"]]
    for entry, rec in zip(entries, records):
        entry.pop("model", None)
        entry.pop("revision", None)
        entry["path"] = rec["local_path"]
    if recipe.slices is not None:   # the records after the base's are the stack's models, each once
        local = {_ref_key(ref): rec["local_path"] for (_, ref), rec in zip(recipe.stack_models(), records[1:])}
        for ref, entry in zip(recipe.slices, data["slices"]):
            entry.pop("model", None)
            entry.pop("revision", None)
            entry["path"] = local[_ref_key(ref)]
    return Recipe.model_validate(data)


def _stage_key(*parts: Any) -> str:
    return fingerprint({"mergelab": __version__, "parts": parts})


def _up_to_date(previous: dict | None, name: str, key: str, folder: Path,
                skip: tuple[str, ...] = VOLATILE_FILES) -> bool:
    stage = (previous or {}).get("stages", {}).get(name)
    return bool(stage and stage.get("key") == key and stage.get("complete", True) and folder.is_dir()
                and hash_tree(folder, skip=skip) == stage.get("outputs"))


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


_TEMP_MARKS = (".partial-", ".mergelab-tmp-", ".mergelab-old-")   # temporaries of a run's stages


def _remove_stale_partials(out_dir: Path) -> None:
    """Remove temporaries (``.NAME.partial-PID``, ``.NAME.mergelab-tmp-PID-X``) left by a run whose
    process is gone (killed, power cut)."""
    for pattern in (".*.partial-*", ".*.mergelab-tmp-*"):
        remove_stale_temps(out_dir, pattern)


def run_recipe(recipe_path: str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike, *,
               device: str = "auto", rules: bool = True, cutoff: str | None = None,
               progress: Callable[[str], None] | None = None, quiet: bool = True,
               budget: float | str | None = None, hardware: str = "a6000", force: bool = False,
               warn: Callable[[str], None] | None = None, allow_nonfinite: bool = False) -> RunResult:
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

    ``allow_nonfinite`` sets the recipe's ``output.allow_nonfinite`` (merge although an input or
    the result holds NaN/Inf; the manifest records it).

    Each stage is recorded in ``manifest.json`` as soon as it finishes (``"finished": false``
    until the last), so a run stopped by Ctrl-C, a kill or a power cut resumes from the last
    finished stage when it is started again into the same folder.
    """
    recipe_file = None if isinstance(recipe_path, Mapping) else Path(recipe_path)
    if recipe_file is not None:
        check_output_path(out_dir, [recipe_file])
    doc = read_recipe(recipe_path)
    if allow_nonfinite and not doc.recipe.output.allow_nonfinite:
        data = doc.recipe.model_dump(mode="json", exclude_none=True)
        data["output"]["allow_nonfinite"] = True
        doc = replace(doc, recipe=Recipe.model_validate(data))
    run = _Run(doc, Path(out_dir), device=device, rules=rules, cutoff=cutoff,
               say=progress or (lambda msg: None), quiet=quiet, force=force)
    run.warn_to = warn or run.say
    run.prepare(budget, hardware)
    run.resolve()
    run.check_rules()
    run.plan_budget()
    merged_dir = run.merge_stages()
    run.evaluate_stage(merged_dir)
    run.base_eval_stage()
    run.card_stage()
    return run.finish()


class _Run:
    """The state of one ``mergelab run`` and its stages, each a method (see :func:`run_recipe`)."""

    def __init__(self, doc, out_dir: Path, *, device: str, rules: bool, cutoff: str | None,
                 say: Callable[[str], None], quiet: bool, force: bool):
        self.doc, self.out_dir, self.device, self.rules, self.cutoff = doc, out_dir, device, rules, cutoff
        self.say, self.quiet, self.force = say, quiet, force
        self.warn_to: Callable[[str], None] = say
        self.recipe, self.finetune, self.eval_section = doc.recipe, doc.finetune, doc.eval
        if self.recipe.eval and self.eval_section is None:
            raise RecipeError(f"{doc.label}: eval.data: list the competition CSV files to evaluate on (got nothing)",
                              hint="e.g. eval: {data: [test.csv], batch_size: 16}")
        self.t_run = time.monotonic()
        self.stages: list[StageReport] = []
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self.records: dict[str, dict] = {}          # the manifest's "stages"
        self.previous: dict | None = None
        self.budget_s: float | None = None
        self.profile = self.plan = self.deadline = self.rule_report = self.data_records = None
        self.models: list[dict] = []
        self.base_comparison: dict | None = None   # base_scores, below_base (eval.compare_base)

    def loud(self, msg: str) -> None:
        self.warnings.append(msg)
        self.warn_to(msg)

    # ------------------------------------------------------------------ before anything is written

    def input_paths(self) -> list[Path]:
        """Every local file or folder the run reads (models, data): the run folder must not be,
        hold or lie inside any of them."""
        refs = [self.recipe.base, *self.recipe.experts, *(self.recipe.slices or [])]
        paths = [Path(r.path) for r in refs if r.path is not None]
        paths += [Path(f) for e in self.recipe.experts for f in (e.data or [])]
        paths += [Path(m["local_path"]) for m in self.models]
        if self.eval_section is not None:
            paths += [Path(f) for f in self.eval_section.data]
            if self.eval_section.options.get("shots"):
                paths.append(Path(self.eval_section.options["shots"]))
        if self.finetune is not None:
            paths += [Path(d.path) for d in self.finetune.data]
        return paths

    def prepare(self, budget: float | str | None, hardware: str) -> None:
        check_output_path(self.out_dir, self.input_paths())
        if budget is not None:
            self.budget_s = parse_budget(budget)
            self.profile = get_profile(hardware)
            self.deadline = self.t_run + self.budget_s
        manifest = self.out_dir / MANIFEST_NAME
        if manifest.is_file():
            try:
                self.previous = read_manifest(manifest)
            except ReproducibilityError:
                self.previous = None
        elif self.out_dir.exists() and any(p for p in self.out_dir.iterdir()
                                                                 if not any(m in p.name for m in _TEMP_MARKS)):
            raise OutputExistsError(f"{self.out_dir} exists and is not a mergelab run folder (no {MANIFEST_NAME})",
                                    hint="choose a new --out folder, or empty this one")
        if self.out_dir.is_dir():
            _remove_stale_partials(self.out_dir)
        if self.finetune is not None:   # fine-tuning data licences, before anything is read or written
            self.data_records = check_data_licences(self.finetune, rules=self.rules, warn=self.loud)

    def resolve(self) -> None:
        t0 = time.perf_counter()
        self.pinned, self.models = _resolve(self.recipe, self.say)
        check_output_path(self.out_dir, self.input_paths())   # with the Hub snapshots too
        self.timings["resolve"] = time.perf_counter() - t0
        self.stages.append(StageReport("resolve", "ran", self.timings["resolve"], f"{len(self.models)} model(s)"))
        self.inputs = {m["role"]: m["files"] for m in self.models}
        self.normalised = self.pinned.model_dump(mode="json", exclude_none=True)
        if self.eval_section is not None:
            self.normalised["eval"] = {"data": [str(p) for p in self.eval_section.data], **self.eval_section.options}
            if self.eval_section.compare_base:
                self.normalised["eval"]["compare_base"] = True
        if self.finetune is not None:
            self.normalised["finetune"] = self.finetune.model_dump(mode="json")

    def check_rules(self) -> None:
        if not self.rules:
            self.stages.append(StageReport("rules", "off", 0.0, "--no-rules"))
            return
        self.say("checking the competition rules")
        t0 = time.perf_counter()
        report = self.rule_report = check_models(recipe_refs(self.pinned), cutoff=self.cutoff,
                                                 stack=recipe_stack(self.pinned))
        self.timings["rules"] = time.perf_counter() - t0
        self.stages.append(StageReport("rules", "ran", self.timings["rules"],
                                       "pass" if report.ok else f"{len(report.failures)} failure(s)"))
        report.require_pass()  # RulesNotMetError saying in words what failed, why, and what to do

    def plan_budget(self) -> None:
        if self.budget_s is not None:
            name = self.profile.name
            self.say(f"planning on the {name} against a budget of {self.budget_s / 60:.1f} min")
            self.plan = plan_run(self.recipe, self.finetune, self.eval_section, Path(self.models[0]["local_path"]),
                                 [Path(m["local_path"]) for m in self.models[1:]], self.profile, self.budget_s)
            if not self.plan.fits:
                if not self.force:
                    raise BudgetError(f"the plan on the {name} {self.plan.verdict}",
                                      hint="`mergelab plan RECIPE` shows each stage; shrink the recipe, raise "
                                           "--budget, or pass --force to run with the deadline enforced")
                self.loud(f"--force: running although the plan on the {name} {self.plan.verdict}")
            else:
                self.say(self.plan.verdict)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def time_left_for(self, stage: str) -> float | None:
        """The deadline of ``stage``: the run's, less the planned time of the stages after it."""
        if self.deadline is None:   # no budget (with one, there is always a plan)
            return None
        names = [s.name for s in self.plan.stages]
        later = names[names.index(stage) + 1:] if stage in names else []
        later = [n for n in later if n != "base_eval"]   # optional: skipped at the deadline, never waited for
        return self.deadline - sum(self.plan.stage(n).seconds for n in later)

    # ------------------------------------------------------------------------------ the stages

    #: model/README.md is the run's card (:meth:`card_stage`), rewritten by every run: the merge and
    #: fold stages hash their folder without it, so a rewritten card never makes them stale.
    MODEL_SKIP = VOLATILE_FILES + (CARD_NAME,)

    def skip_if_done(self, name: str, key: str, folder: Path, skip: tuple[str, ...] = VOLATILE_FILES) -> bool:
        """True (and the stage recorded as skipped) when the manifest says it is up to date."""
        if not _up_to_date(self.previous, name, key, folder, skip):
            return False
        self.stages.append(StageReport(name, "skipped", 0.0, "inputs and outputs match the manifest"))
        self.records[name] = self.previous["stages"][name]
        return True

    def finished(self, name: str, record: dict) -> None:
        """Record a finished stage and write the manifest so far: a rerun resumes after it."""
        self.records[name] = record
        write_manifest(self.out_dir / MANIFEST_NAME, self.manifest(finished=False))

    def finetune_stage(self, model_path: Path, model_hashes: Any) -> None:
        ft_dir = self.out_dir / FINETUNE_DIR
        key = _stage_key(self.normalised["finetune"], [r["sha256"] for r in self.data_records], model_hashes)
        if self.skip_if_done("finetune", key, ft_dir):
            return
        ft = self.finetune
        self.say(f"fine-tuning a LoRA adapter ({ft.when}, {ft.steps} steps)")
        tmp = _atomic_dir(ft_dir)
        try:
            res = train_adapter(model_path, ft, tmp, device=self.device, deadline=self.time_left_for("finetune"))
            _replace_dir(tmp, ft_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.timings["finetune"] = res.seconds
        detail = f"{res.steps_done}/{res.steps} steps, loss {res.losses[0]:.3f} → {res.losses[-1]:.3f}"
        if res.stopped_by_deadline:
            detail = "DEADLINE: stopped early, " + detail
            self.loud(f"fine-tuning stopped by the deadline after {res.steps_done} of {res.steps} steps")
        self.stages.append(StageReport("finetune", "partial" if res.stopped_by_deadline else "ran", res.seconds,
                                       detail))
        self.finished("finetune", {"key": key, "outputs": hash_tree(ft_dir, skip=VOLATILE_FILES),
                                   "seconds": res.seconds, "data": self.data_records, "seed": ft.seed,
                                   "steps_done": res.steps_done, "losses": res.losses, "complete": res.complete})

    def merge_recipe(self) -> Recipe:
        """The recipe the engine runs: local folders, plus the adapter trained before the merge."""
        local = _local_recipe(self.pinned, self.models)
        if self.finetune is None or self.finetune.when != "before_merge":
            return local
        data = local.model_dump(mode="json", exclude_none=True)
        data["experts"].append({"path": str(self.out_dir / FINETUNE_DIR), **self.finetune.expert})
        try:
            return Recipe.model_validate(data)
        except (ValidationError, RecipeError) as exc:
            raise RecipeError(f"finetune: the trained adapter cannot join the merge as an expert ({exc})",
                              hint="check finetune.expert against the method's per-expert parameters") from None

    def merge_stages(self) -> Path:
        """Fine-tune before, merge, fine-tune after and fold; return the model folder evaluated."""
        ft, out = self.finetune, self.out_dir
        if ft is not None and ft.when == "before_merge":
            self.finetune_stage(Path(self.models[0]["local_path"]), self.inputs["base"])
        after = ft is not None and ft.when == "after_merge"
        merged_dir = out / (MERGED_DIR if after else MODEL_DIR)
        self.merge_stage(merged_dir, after)
        self.final_outputs = self.records["merge"]["outputs"]
        if after:
            self.finetune_stage(merged_dir, self.records["merge"]["outputs"])
            self.fold_stage(merged_dir)
            self.final_outputs = self.records["fold"]["outputs"]
        elif (out / MERGED_DIR).exists():
            shutil.rmtree(out / MERGED_DIR)
        if ft is None and (out / FINETUNE_DIR).exists():
            shutil.rmtree(out / FINETUNE_DIR)
        return out / MODEL_DIR

    def merge_stage(self, merged_dir: Path, after: bool) -> None:
        merge_part = {k: v for k, v in self.normalised.items() if k not in ("eval", "finetune")}
        extra = (self.records["finetune"]["outputs"], self.normalised["finetune"]["expert"]) \
            if self.finetune is not None and not after else None
        key = _stage_key(merge_part, self.inputs, *([extra] if extra else []))
        if self.skip_if_done("merge", key, merged_dir, self.MODEL_SKIP):
            return
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.loud("the deadline passed before the merge; merging anyway so that a submission can be written")
        self.say(f"merging with {self.recipe.method.name}")
        t0 = time.perf_counter()
        result = merge(self.merge_recipe(), merged_dir, device=self.device, force=True, progress=not self.quiet,
                       warn=self.loud, card=False)
        self.timings["merge"] = time.perf_counter() - t0
        self.stages.append(StageReport("merge", "ran", self.timings["merge"], str(getattr(result, "method", ""))))
        self.finished("merge", {"key": key, "outputs": hash_tree(merged_dir, skip=self.MODEL_SKIP),
                                "seconds": self.timings["merge"]})

    def fold_stage(self, merged_dir: Path) -> None:
        """Fold the adapter trained on the merge into its weights: ``model/ = merged + ΔW``."""
        model_dir = self.out_dir / MODEL_DIR
        key = _stage_key(self.records["merge"]["outputs"], self.records["finetune"]["outputs"],
                         self.normalised["output"])
        if self.skip_if_done("fold", key, model_dir, self.MODEL_SKIP):
            return
        self.say("folding the trained adapter into the merged model")
        t0 = time.perf_counter()
        fold = {"base": {"path": str(merged_dir)},
                "experts": [{"path": str(self.out_dir / FINETUNE_DIR), "weight": 1.0}],
                "method": {"name": "task_arithmetic"}, "output": self.normalised["output"]}
        merge(fold, model_dir, device=self.device, force=True, progress=not self.quiet, card=False)
        self.timings["fold"] = time.perf_counter() - t0
        self.stages.append(StageReport("fold", "ran", self.timings["fold"], "W + ΔW of the trained adapter"))
        self.finished("fold", {"key": key, "outputs": hash_tree(model_dir, skip=self.MODEL_SKIP),
                               "seconds": self.timings["fold"]})

    def evaluate_stage(self, model_dir: Path) -> None:
        eval_dir, section = self.out_dir / EVAL_DIR, self.eval_section
        if section is None:
            self.stages.append(StageReport("eval", "off", 0.0, "no eval section"))
            if eval_dir.exists():
                shutil.rmtree(eval_dir)
            return
        data_hashes = {str(p): sha256_file(p) for p in section.data}
        if section.options.get("shots"):
            data_hashes[str(section.options["shots"])] = sha256_file(section.options["shots"])
        lora = self.recipe.output.format == "lora"
        key = _stage_key(self.eval_key_part(), self.final_outputs, data_hashes, self.inputs["base"] if lora else None)
        if self.skip_if_done("eval", key, eval_dir):
            return
        self.say(f"evaluating on {len(section.data)} file(s)")
        t0 = time.perf_counter()
        options = section.eval_options(self.device)
        with ProgressBar(not self.quiet, eval_columns, total=1) as bar:   # rows, with the time left
            def rows_done(done: int, total: int) -> None:
                bar.update(completed=done, total=total)
            if lora:
                scores = evaluate(self.models[0]["local_path"], section.data, eval_dir, options, adapter=model_dir,
                                  force=True, deadline=self.deadline, label="base + model/ (adapter)",
                                  on_progress=rows_done)
            else:
                scores = evaluate(model_dir, section.data, eval_dir, options, force=True, deadline=self.deadline,
                                  label="model/", on_progress=rows_done)
        self.timings["eval"] = time.perf_counter() - t0
        overall = scores.get("overall", {})
        missed = int(overall.get("not_reached", 0) or 0)
        detail = ", ".join(f"{k}={v:.3f}" for k, v in overall.items() if isinstance(v, float))
        status = "ran"
        if not scores.get("complete", True):
            status = "partial"
            detail = (f"DEADLINE: {missed} of {overall.get('rows', missed)} rows not reached "
                      f"(fallback: choice 0 / empty text); " + detail)
            self.loud(f"evaluation hit the deadline: {missed} row(s) not reached got the fallback prediction; "
                      f"the submission files are complete but those rows are guesses")
        self.stages.append(StageReport("eval", status, self.timings["eval"], detail))
        self.finished("eval", {"key": key, "outputs": hash_tree(eval_dir, skip=VOLATILE_FILES),
                               "seconds": self.timings["eval"], "data": data_hashes,
                               "complete": bool(scores.get("complete", True)), "rows_not_reached": missed})

    def eval_key_part(self) -> dict:
        """What an evaluation depends on in the eval section (``compare_base`` is not of it)."""
        return {k: v for k, v in self.normalised["eval"].items() if k != "compare_base"}

    def base_eval_stage(self) -> None:
        """With ``eval: {compare_base: true}``: score the base on the same files (nothing written but
        the manifest's record) and name each task the merge leaves below it (a warning, the
        manifest's ``below_base``, the report). After the submission is complete; skipped, with a
        warning, when the deadline has passed."""
        section = self.eval_section
        if section is None or not section.compare_base:
            return
        data_hashes = {str(p): sha256_file(p) for p in section.data}
        key = _stage_key("base_eval", self.eval_key_part(), self.inputs["base"], data_hashes)
        previous = (self.previous or {}).get("stages", {}).get("base_eval")
        if previous and previous.get("key") == key and isinstance(previous.get("scores"), dict):
            self.stages.append(StageReport("base_eval", "skipped", 0.0, "inputs match the manifest"))
            self.records["base_eval"] = previous
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            self.stages.append(StageReport("base_eval", "off", 0.0, "DEADLINE: no time left"))
            self.loud("the deadline passed before the base could be scored (eval.compare_base): this run cannot "
                      "say which tasks the merge leaves below the base")
            return
        else:
            self.say(f"scoring the base on the same {len(section.data)} file(s) (eval.compare_base)")
            t0 = time.perf_counter()
            with ProgressBar(not self.quiet, eval_columns, total=1) as bar:
                def rows_done(done: int, total: int) -> None:
                    bar.update(completed=done, total=total)
                scores = evaluate(self.models[0]["local_path"], section.data, None, section.eval_options(self.device),
                                  deadline=self.deadline, label="base", on_progress=rows_done)
            self.timings["base_eval"] = time.perf_counter() - t0
            if not scores.get("complete", True):
                self.stages.append(StageReport("base_eval", "partial", self.timings["base_eval"],
                                               "DEADLINE: not every row scored; not compared"))
                self.loud("the deadline stopped scoring the base (eval.compare_base) before every row: this run "
                          "cannot say which tasks the merge leaves below the base")
                return
            base = {Path(f).stem: s["score"] for f, s in scores["files"].items()}
            self.stages.append(StageReport("base_eval", "ran", self.timings["base_eval"],
                                           ", ".join(f"{t}={v:.3f}" for t, v in base.items() if v is not None)))
            self.finished("base_eval", {"key": key, "scores": base, "seconds": self.timings["base_eval"]})
        self.compare_with_base(self.records["base_eval"]["scores"])

    def compare_with_base(self, base: dict[str, float | None]) -> None:
        merged_scores = read_scores(self.out_dir) or {}
        merged = {Path(f).stem: s.get("score") for f, s in merged_scores.get("files", {}).items()}
        if not any(v is not None and base.get(t) is not None for t, v in merged.items()):
            self.loud("eval.compare_base: no evaluation file has targets, so neither the merge nor the base has a "
                      "score to compare; give labelled files (e.g. a validation split) to see the comparison")
        below = below_base(merged, base)
        self.base_comparison = {"base_scores": base, "below_base": below}
        if below:
            self.loud("the merge scores below the base model on " + ", ".join(
                f"{t} ({merged[t]:.4f} < {base[t]:.4f})" for t in below) + ": merging is worse there than not "
                "merging at all; try per-task weights, a data-aware method (regmean) or mergelab tune with "
                "below_base_penalty")

    def card_stage(self) -> None:
        """Write the run's model card ``model/README.md``: pinned recipe, inputs and licences, rule
        check and scores (:mod:`mergelab.merge.card`). Rewritten by every run (same inputs, same
        bytes), after evaluation; recorded as the ``card`` output."""
        inputs = inputs_from_records(self.models)
        if self.finetune is not None and self.finetune.when == "before_merge":
            inputs.append(CardInput(f"expert {len(inputs)}", path=f"{FINETUNE_DIR}/ (the adapter this run trained)"))
        rules = self.rule_report.to_dict() if self.rule_report is not None else "--no-rules"
        scores_file = self.out_dir / EVAL_DIR / "scores.json"
        scores = json.loads(scores_file.read_text()) if self.eval_section is not None and scores_file.is_file() else None
        text, warnings = render_card(inputs, self.normalised, method=self.recipe.method.name,
                                     output_format=self.recipe.output.format, rules=rules, scores=scores)
        for w in warnings:
            self.loud(w)
        card = write_card(self.out_dir / MODEL_DIR, text)
        self.records["card"] = {"outputs": {CARD_NAME: sha256_file(card)}}

    # ------------------------------------------------------------------------------ the record

    def budget_record(self) -> dict:
        used, plan = time.monotonic() - self.t_run, self.plan
        record = {
            "budget_s": self.budget_s, "hardware": self.profile.name, "forced": bool(self.force) and not plan.fits,
            "planned_s": plan.total_s, "planned": {s.name: s.seconds for s in plan.stages},
            "plan_verdict": plan.verdict,
            "used_s": used, "used": dict(self.timings), "over_budget": used > self.budget_s,
            "eval_complete": self.records.get("eval", {}).get("complete", True),
            "rows_not_reached": self.records.get("eval", {}).get("rows_not_reached", 0),
        }
        finetuned = self.records.get("finetune", {})
        if not finetuned.get("complete", True):
            record["finetune_steps_done"] = finetuned["steps_done"]
        if used > self.budget_s:
            self.loud(f"the run took {used / 60:.1f} min, over the budget of {self.budget_s / 60:.1f} min")
        return record

    def outputs(self) -> dict[str, str]:
        """Every output file so far with its sha256, by its path in the run folder."""
        after = self._merge_to_merged()
        final = self.records.get("fold" if after else "merge", {}).get("outputs", {})
        outputs = {f"{MODEL_DIR}/{k}": v for k, v in final.items()}
        outputs |= {f"{MODEL_DIR}/{k}": v for k, v in self.records.get("card", {}).get("outputs", {}).items()}
        if after:
            outputs |= {f"{MERGED_DIR}/{k}": v for k, v in self.records.get("merge", {}).get("outputs", {}).items()}
        if self.finetune is not None:
            outputs |= {f"{FINETUNE_DIR}/{k}": v for k, v in self.records.get("finetune", {}).get("outputs", {}).items()}
        outputs |= {f"{EVAL_DIR}/{k}": v for k, v in self.records.get("eval", {}).get("outputs", {}).items()}
        return outputs

    def manifest(self, *, finished: bool, budget: dict | None = None) -> dict:
        manifest = {
            "mergelab_manifest": 1,
            "created": now_iso(),
            "recipe": self.normalised,
            "models": self.models,
            "seed": self.recipe.seed,
            "rules": self.rule_report.to_dict() if self.rule_report is not None else "not checked (--no-rules)",
            "versions": package_versions(),
            "device": device_info(self.device),
            "stages": self.records,
            "timings": self.timings,
            "outputs": self.outputs(),
        }
        if not finished:
            manifest["finished"] = False   # a stage is still to run: `reproduce` refuses it, a rerun resumes
        if self.finetune is not None:
            manifest["finetune"] = {"when": self.finetune.when, "seed": self.finetune.seed, "data": self.data_records}
        if budget is not None:
            manifest["budget"] = budget
        if self.base_comparison is not None:
            manifest.update(self.base_comparison)
        if self.warnings:
            manifest["warnings"] = self.warnings
        pushed = (self.previous or {}).get("push")
        if finished and pushed and self.previous.get("outputs") == manifest["outputs"]:
            manifest["push"] = pushed   # `mergelab push` of these very bytes: still true
        return manifest

    def _merge_to_merged(self) -> bool:
        return self.finetune is not None and self.finetune.when == "after_merge"

    def finish(self) -> RunResult:
        budget = self.budget_record() if self.budget_s is not None else None
        manifest = self.manifest(finished=True, budget=budget)
        (self.out_dir / "timing.json").write_text(json.dumps(self.timings, indent=2) + "\n")
        write_manifest(self.out_dir / MANIFEST_NAME, manifest)
        write_run_report(self.out_dir, manifest, stages=[asdict(s) for s in self.stages])   # last: report.html
        return RunResult(self.out_dir, manifest, self.stages, plan=self.plan, warnings=self.warnings)


def reproduce(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, *, device: str = "auto",
              progress: Callable[[str], None] | None = None, quiet: bool = True) -> RunResult:
    """Run a manifest's recipe again into ``out_dir`` and compare every input and output hash.

    Before anything runs, the manifest's shape (:func:`~mergelab.run.manifest.read_manifest`), its
    recipe, the roles of its models and its evaluation files are checked, so that a bad manifest is
    one error at once rather than after the whole rerun. Raises :class:`OutputsDifferError` naming
    each input file that changed and each output file whose bytes differ (or that is missing / new).
    """
    old = read_manifest(manifest_path)   # its shape is checked: recipe, outputs, models with roles, ...
    if old.get("finished") is False:
        raise ReproducibilityError(f"{manifest_path} is the manifest of a run that did not finish",
                                   hint="run `mergelab run` into its folder again to finish it, then reproduce")
    # Everything that can be checked before the rerun is checked now, not after an hour of merging:
    # the recipe, the models it names against the manifest's, and the evaluation files.
    try:
        doc = read_recipe(old["recipe"])
        for f in doc.eval.data if doc.eval is not None else []:
            read_competition_csv(f)
    except (RecipeError, DataError) as exc:
        raise type(exc)(f"{manifest_path}: the recorded recipe cannot run again: {exc.message}",
                        hint=exc.hint) from None
    roles = ["base"] + ([role for role, _ in doc.recipe.stack_models()] if doc.recipe.slices is not None
                        else [f"expert {i}" for i in range(1, len(doc.recipe.experts) + 1)])
    recorded = [m["role"] for m in old.get("models", [])]
    if sorted(recorded) != sorted(roles):
        raise ReproducibilityError(
            f"{manifest_path}: models records the roles {', '.join(recorded) or 'none'}, but its recipe "
            f"has {', '.join(roles)}", hint="pass the manifest.json that `mergelab run` wrote, unedited")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not _unfinished_rerun_of(out_dir, old):
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


def _unfinished_rerun_of(out_dir: Path, old: dict) -> bool:
    """Whether ``out_dir`` holds an interrupted reproduction of ``old`` (same recipe, not finished):
    then reproducing into it again resumes from its last finished stage."""
    try:
        previous = read_manifest(out_dir / MANIFEST_NAME)
    except ReproducibilityError:
        return False
    return previous.get("finished") is False and previous.get("recipe") == old.get("recipe")
