"""``mergelab run``: recipe → resolved models → (rule check) → merge → evaluation → submission.

A run writes into one folder::

    DIR/model/          the merged model (format: full) or the merged adapter (format: lora)
    DIR/eval/X.csv      submission file for each evaluation file X.csv (with eval/scores.json,
                        eval/predictions/X.jsonl)
    DIR/timing.json     stage timings of the last invocation (volatile: not hashed)
    DIR/manifest.json   normalised recipe, resolved commits, input/output sha256, versions, seeds

Running again into the same folder skips a stage whose inputs (recipe section and input file
hashes) and outputs (file hashes) still match the manifest. :func:`reproduce` runs a manifest's
recipe again into a new folder and names every output file whose bytes differ.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergelab import __version__
from mergelab.errors import MergelabError, RecipeError, ReproducibilityError
from mergelab.manifest import (MANIFEST_NAME, VOLATILE_FILES, device_info, fingerprint, hash_tree,
                               now_iso, package_versions, read_manifest, sha256_file, write_manifest)

MODEL_DIR, EVAL_DIR = "model", "eval"


class OutputsDifferError(ReproducibilityError):
    """A reproduced run wrote different bytes (or read different inputs) than its manifest says."""

    exit_code = 1


class EvalSection(BaseModel):
    """The ``eval:`` section of a recipe: the data files plus the options of ``mergelab eval``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: list[Path] = Field(min_length=1, description="competition CSV files to evaluate on")
    options: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, section: Mapping[str, Any], root: Path) -> "EvalSection":
        """Split ``{data: [...], <EvalOptions fields>}``, checking each against its schema."""
        from mergelab.evaluate import EvalOptions

        section = dict(section)
        data = section.pop("data", None)
        if isinstance(data, (str, Path)):
            data = [data]
        if not data:
            raise RecipeError("eval.data: list the competition CSV files to evaluate on (got nothing)",
                              hint="e.g. eval: {data: [test.csv], batch_size: 16}")
        paths = [Path(p) if Path(p).is_absolute() else (root / p) for p in data]
        for i, p in enumerate(paths):
            if not p.is_file():
                raise RecipeError(f"eval.data[{i}]: file {p} does not exist")
        if section.get("shots") and not Path(section["shots"]).is_absolute():
            section["shots"] = str(root / section["shots"])
        try:
            options = EvalOptions(**section)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            raise RecipeError(f"eval.{where}: {msg} (got {err.get('input')!r})",
                              hint="eval: takes `data` plus the options of `mergelab eval` (see docs/eval.md)") from None
        return cls(data=[p.resolve() for p in paths], options=options.model_dump(mode="json", exclude_defaults=True))

    def eval_options(self, device: str):
        from mergelab.evaluate import EvalOptions

        opts = dict(self.options)
        if device != "auto":
            opts["device"] = device
        return EvalOptions(**opts)


@dataclass
class StageReport:
    name: str
    status: str          # "ran", "skipped" (up to date), "off" (not in the recipe)
    seconds: float = 0.0
    detail: str = ""


@dataclass
class RunResult:
    out_dir: Path
    manifest: dict
    stages: list[StageReport] = field(default_factory=list)


def _recipe_root(recipe_path: str | os.PathLike | None) -> Path:
    return Path(recipe_path).resolve().parent if recipe_path is not None else Path.cwd()


def _input_files(folder: Path, listed: tuple[str, ...]) -> dict[str, str]:
    """sha256 of the files of a model folder that mergelab reads (weights, config, tokenizer, adapter)."""
    from mergelab.sources import select_files

    names = select_files(listed) if listed else []
    return {n: sha256_file(folder / n) for n in names if (folder / n).is_file()}


def _resolve(recipe, progress: Callable[[str], None]) -> tuple[Any, list[dict]]:
    """Resolve every model of the recipe; return the recipe pinned to commits, and the records."""
    from mergelab.recipe import Recipe
    from mergelab.sources import resolve_ref

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
        records.append(rec)
        if res.source == "hub":   # pin: the normalised recipe names the commit, not a branch
            entry.pop("path", None)
            entry["revision"] = res.commit_sha
        else:
            entry["path"] = str(res.local_path)
    return Recipe.model_validate(data), records


def _local_recipe(recipe, records: list[dict]):
    """The recipe with every model as a local folder (what the engine reads)."""
    from mergelab.recipe import Recipe

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
    return bool(stage and stage.get("key") == key and folder.is_dir()
                and hash_tree(folder, skip=VOLATILE_FILES) == stage.get("outputs"))


def run_recipe(recipe_path: str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike, *,
               device: str = "auto", rules: bool = True, cutoff: str | None = None,
               progress: Callable[[str], None] | None = None, quiet: bool = True) -> RunResult:
    """Run a recipe into ``out_dir``: resolve, check the rules, merge, evaluate; write the manifest.

    ``recipe_path`` is a recipe file or an already-read dict (paths then count from the current
    folder). With ``rules`` the competition rule check must pass before anything is merged.
    """
    from mergelab.engine import merge
    from mergelab.recipe import load_recipe

    say = progress or (lambda msg: None)
    out_dir = Path(out_dir)
    root = _recipe_root(None if isinstance(recipe_path, Mapping) else recipe_path)
    recipe = load_recipe(recipe_path)
    eval_section = EvalSection.parse(recipe.eval, root) if recipe.eval else None
    previous = None
    if (out_dir / MANIFEST_NAME).is_file():
        try:
            previous = read_manifest(out_dir / MANIFEST_NAME)
        except ReproducibilityError:
            previous = None
    elif out_dir.exists() and any(out_dir.iterdir()):
        from mergelab.errors import OutputExistsError

        raise OutputExistsError(f"{out_dir} exists and is not a mergelab run folder (no {MANIFEST_NAME})",
                                hint="choose a new --out folder, or empty this one")
    out_dir.mkdir(parents=True, exist_ok=True)

    stages: list[StageReport] = []
    timings: dict[str, float] = {}

    # 1. resolve
    t0 = time.perf_counter()
    pinned, models = _resolve(recipe, say)
    timings["resolve"] = time.perf_counter() - t0
    stages.append(StageReport("resolve", "ran", timings["resolve"], f"{len(models)} model(s)"))

    # 2. rules
    rule_report = None
    if rules:
        from mergelab.rules import check_models, recipe_refs

        say("checking the competition rules")
        t0 = time.perf_counter()
        rule_report = check_models(recipe_refs(pinned), cutoff=cutoff)
        timings["rules"] = time.perf_counter() - t0
        stages.append(StageReport("rules", "ran", timings["rules"],
                                  "pass" if rule_report.ok else f"{len(rule_report.failures)} failure(s)"))
        if not rule_report.ok:
            from mergelab.rules import RulesNotMetError

            failed = sorted({f"{f.model} [{f.rule}]" for f in rule_report.failures})
            raise RulesNotMetError(
                f"the recipe does not meet the competition rules: {', '.join(failed)}",
                hint="`mergelab check RECIPE` shows each reason; fix the recipe, or pass --no-rules for a "
                     "run outside the competition")
    else:
        stages.append(StageReport("rules", "off", 0.0, "--no-rules"))

    inputs = {m["role"]: m["files"] for m in models}
    normalised = pinned.model_dump(mode="json", exclude_none=True)
    if eval_section is not None:
        normalised["eval"] = {"data": [str(p) for p in eval_section.data], **eval_section.options}

    # 3. merge
    model_dir = out_dir / MODEL_DIR
    merge_part = {k: v for k, v in normalised.items() if k != "eval"}
    merge_key = _stage_key(merge_part, inputs)
    stage_records: dict[str, dict] = {}
    if _up_to_date(previous, "merge", merge_key, model_dir):
        stages.append(StageReport("merge", "skipped", 0.0, "inputs and outputs match the manifest"))
        stage_records["merge"] = previous["stages"]["merge"]
    else:
        say(f"merging with {recipe.method.name}")
        t0 = time.perf_counter()
        result = merge(_local_recipe(pinned, models), model_dir, device=device, force=True, progress=not quiet)
        timings["merge"] = time.perf_counter() - t0
        stages.append(StageReport("merge", "ran", timings["merge"], str(getattr(result, "method", ""))))
        stage_records["merge"] = {"key": merge_key, "outputs": hash_tree(model_dir, skip=VOLATILE_FILES),
                                  "seconds": timings["merge"]}

    # 4. evaluate
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
        eval_key = _stage_key(normalised["eval"], stage_records["merge"]["outputs"], data_hashes,
                              inputs["base"] if recipe.output.format == "lora" else None)
        if _up_to_date(previous, "eval", eval_key, eval_dir):
            stages.append(StageReport("eval", "skipped", 0.0, "inputs and outputs match the manifest"))
            stage_records["eval"] = previous["stages"]["eval"]
        else:
            from mergelab.evaluate import evaluate

            say(f"evaluating on {len(eval_section.data)} file(s)")
            t0 = time.perf_counter()
            options = eval_section.eval_options(device)
            if recipe.output.format == "lora":
                scores = evaluate(models[0]["local_path"], eval_section.data, eval_dir, options,
                                  adapter=model_dir, force=True)
            else:
                scores = evaluate(model_dir, eval_section.data, eval_dir, options, force=True)
            timings["eval"] = time.perf_counter() - t0
            overall = scores.get("overall", {})
            stages.append(StageReport("eval", "ran", timings["eval"],
                                      ", ".join(f"{k}={v:.3f}" for k, v in overall.items()
                                                if isinstance(v, float))))
            stage_records["eval"] = {"key": eval_key, "outputs": hash_tree(eval_dir, skip=VOLATILE_FILES),
                                     "seconds": timings["eval"], "data": data_hashes}

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
        "outputs": {f"{MODEL_DIR}/{k}": v for k, v in stage_records["merge"]["outputs"].items()}
        | {f"{EVAL_DIR}/{k}": v for k, v in stage_records.get("eval", {}).get("outputs", {}).items()},
    }
    (out_dir / "timing.json").write_text(json.dumps(timings, indent=2) + "\n")
    write_manifest(out_dir / MANIFEST_NAME, manifest)
    return RunResult(out_dir, manifest, stages)


def reproduce(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, *, device: str = "auto",
              progress: Callable[[str], None] | None = None, quiet: bool = True) -> RunResult:
    """Run a manifest's recipe again into ``out_dir`` and compare every input and output hash.

    Raises :class:`OutputsDifferError` naming each input file that changed and each output file
    whose bytes differ (or that is missing / new).
    """
    old = read_manifest(manifest_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        from mergelab.errors import OutputExistsError

        raise OutputExistsError(f"{out_dir} is not empty", hint="reproduce into a new folder")
    rules = isinstance(old.get("rules"), dict)
    result = run_recipe(old["recipe"], out_dir, device=device, rules=rules, progress=progress, quiet=quiet)
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
