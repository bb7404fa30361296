"""``run_tune``: a recipe with a ``tune:`` section → an optuna study → the tuned recipe and a report.

1. The recipe file is read; its ``tune:`` section is taken out and validated
   (:mod:`mergelab.tune.config`); the rest is an ordinary recipe (:func:`~mergelab.recipe.load_recipe`).
2. The validation files are split into search and check parts (:mod:`mergelab.tune.objective`),
   written to ``DIR/split/{search,check}/``.
3. The optuna study is created or continued in ``storage`` (default ``sqlite:///DIR/study.db``)
   under ``study`` (default ``<recipe stem>-<fingerprint>``). A study remembers the fingerprint
   of what its trials depend on; continuing it with another recipe, space or data is refused.
4. The base model is loaded once; :class:`~mergelab.merge.inplace.InPlaceMerger` writes each
   trial's merge into it; the objective is computed on the search part (returned to the sampler)
   and on the check part (recorded only).
5. The study stops at ``trials`` (this invocation's trials) or after ``time_limit`` (checked
   between trials: a trial that has started is finished), or on Ctrl-C; in every case the best
   trial so far (by the search objective) is written out.
"""
from __future__ import annotations

import csv
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mergelab.errors import MergelabError
from mergelab.recipe import load_recipe, read_recipe
from mergelab.tune.config import SearchSpace, fingerprint
from mergelab.recipe import layer_depths
from mergelab.io.checkpoint import CheckpointReader
from mergelab.recipe.sections import ParamRange, TuneError, TuneSection, parse_eval_options
from mergelab.tune.objective import DIRECTIONS, BelowBasePenalty, Objective, load_splits, write_rows
from mergelab.util import atomic_write, check_output_path
from mergelab.evaluate.loading import load_model_and_tokenizer
from mergelab.merge.inplace import InPlaceMerger
from mergelab.tune.config import round_value
from mergelab.tune.gradient import (DEFAULT_LEARNING_RATE, DEFAULT_STEPS, LinearMerge, check_gradient_space, learn,
                                    start_values)
from mergelab import htmlpage as h

TUNED_RECIPE, TRIALS_CSV, REPORT, PLOT = "recipe.tuned.yaml", "trials.csv", "report.md", "search.png"
REPORT_HTML = "report.html"


@dataclass
class TrialRecord:
    """One finished trial as the report shows it."""

    number: int
    search: float
    check: float
    values: dict[str, float]
    seconds: float
    search_tasks: dict[str, float] = field(default_factory=dict)
    check_tasks: dict[str, float] = field(default_factory=dict)
    start: bool = False          # the recipe's own parameters

    def gap(self, direction: str) -> float:
        """How much better the search value is than the check value (positive: overfitting)."""
        return self.search - self.check if direction == "maximize" else self.check - self.search


@dataclass
class TuneResult:
    out_dir: Path
    study_name: str
    storage: str
    direction: str
    best: TrialRecord
    trials: list[TrialRecord]
    failed: int
    stopped_by: str
    warnings: list[str]
    seconds: float
    new_trials: int
    merger: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "optuna"
    trajectory: list[float] = field(default_factory=list)   # optimizer gradient: the loss at each step
    split_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    tuned_recipe: dict = field(default_factory=dict)
    constant_tasks: dict[str, float] = field(default_factory=dict)   # task: its one search value
    base_tasks: dict[str, dict[str, float]] = field(default_factory=dict)   # part: {task: base's value}
    below_base_penalty: float = 0.0


# ------------------------------------------------------------------------------------- reading


def _eval_options(section: TuneSection, recipe_data: Mapping[str, Any], root: Path, device: str):
    """The evaluation options of the trials: the tune section's own ``eval``, else the recipe's."""
    if section.eval is not None:
        where, opts = "tune.eval", dict(section.eval)
    else:
        where, opts = "eval", {k: v for k, v in (recipe_data.get("eval") or {}).items()
                               if k not in ("data", "compare_base")}   # keys of `mergelab run`, not options
    if device != "auto":
        opts["device"] = device
    return parse_eval_options(opts, where, root, error=TuneError)


def _overrides(section: TuneSection, **kw: Any) -> TuneSection:
    from pydantic import ValidationError

    given = {k: v for k, v in kw.items() if v is not None}
    if not given:
        return section
    try:
        return TuneSection.model_validate({**section.model_dump(), **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "an option"
        raise TuneError(f"{flag}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})") from None


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise TuneError("mergelab tune needs the optuna package", hint="pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_sampler(name: str, seed: int, start: Mapping[str, float] | None = None):
    """A seeded optuna sampler: ``tpe`` or ``cmaes`` (needs the ``cmaes`` package)."""
    optuna = _import_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise TuneError("tune.sampler: cmaes needs the cmaes package",
                        hint="pip install cmaes, or use sampler: tpe") from None
    if not start:
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # x0 (CMA-ES's initial mean = the recipe's own values) is deprecated since optuna 4.9 with no
    # replacement yet; the start trial is enqueued either way, so without x0 only the mean differs
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*x0.*deprecated", category=FutureWarning)
            return optuna.samplers.CmaEsSampler(seed=seed, x0=dict(start), warn_independent_sampling=False)
    except TypeError:  # an optuna that no longer takes x0
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


# ------------------------------------------------------------------------------------ the study


def run_tune(recipe_path: str | os.PathLike, out_dir: str | os.PathLike, *, storage: str | None = None,
             study: str | None = None, trials: int | None = None, time_limit: float | str | None = None,
             sampler: str | None = None, seed: int | None = None, device: str = "auto",
             progress: Callable[[str], None] | None = None,
             objective: Callable[[Any, str], tuple[float, dict]] | None = None,
             direction: str | None = None) -> TuneResult:
    """Search the merge parameters of a recipe's ``tune:`` section; write the outputs to ``out_dir``.

    Keyword arguments override the tune section (the CLI flags). ``objective(model, part)``
    replaces the built-in objective (``part`` is ``"search"`` or ``"check"``; it returns
    ``(value, per-task values)``) with ``direction`` ``"maximize"``/``"minimize"`` — for
    experiments and tests. Returns the :class:`TuneResult`; writes ``recipe.tuned.yaml``,
    ``trials.csv``, ``report.md`` and ``search.png``.
    """
    t_start = time.monotonic()
    say = progress or (lambda msg: None)
    recipe_path = Path(recipe_path)
    out_dir = Path(out_dir)
    doc = read_recipe(recipe_path)
    if doc.tune is None:
        raise TuneError(f"{recipe_path}: the recipe has no `tune:` section, so there is nothing to search",
                        hint="add tune: {params: {...}, data: [...], trials: N}; see docs/tune.md")
    recipe_data, section, root = doc.data, doc.tune, doc.root
    refs = [doc.recipe.base, *doc.recipe.experts]   # the out folder is never, holds or lies in an input
    check_output_path(out_dir, [recipe_path, *section.data, *[r.path for r in refs if r.path is not None],
                                *[f for e in doc.recipe.experts for f in (e.data or [])]])
    section = _overrides(section, trials=trials, time_limit=time_limit, sampler=sampler, seed=seed,
                         storage=storage, study=study)
    search_only = [f"--{k}" for k, v in (("trials", trials), ("sampler", sampler), ("storage", storage),
                                         ("study", study)) if v is not None]
    if section.optimizer == "gradient" and search_only:   # said, not silently ignored
        raise TuneError(f"{', '.join(search_only)}: options of the optuna search; optimizer: gradient runs "
                        "tune.steps steps of gradient descent in memory (no trials, sampler or study)",
                        hint="set tune.steps (and tune.learning_rate) in the recipe; --time-limit applies to both")
    base_recipe = load_recipe(recipe_data, base_dir=root)
    if section.params is None:   # optimizer gradient's default: one weight per expert per layer
        section = section.model_copy(update={"params": default_gradient_params(base_recipe)})
    space = SearchSpace(recipe_data, section)
    for corner in ("low", "high"):  # every value in range makes a valid recipe
        try:
            load_recipe(space.recipe_dict({d.name: getattr(d, corner) for d in space.dims}), base_dir=root)
        except MergelabError as exc:
            raise TuneError(f"tune.params: with every parameter at its {corner} end the recipe is "
                            f"invalid: {exc.message}") from None
    options = _eval_options(section, recipe_data, root, device)
    if section.optimizer == "gradient":
        if objective is not None:
            raise TuneError("optimizer: gradient descends the built-in entropy objective; a custom objective "
                            "has no gradient", hint="use optimizer: optuna with a custom objective")
        return _run_gradient(recipe_path, out_dir, recipe_data, section, root, base_recipe, space, options, say,
                             t_start)
    direction = direction or DIRECTIONS[section.objective]
    optuna = _import_optuna()

    splits = load_splits(section.data, section.check_fraction, section.split_seed,
                         section.rows_per_task, section.objective)
    files = _write_splits(out_dir, splits)
    fp = fingerprint(recipe_data, section)
    storage_url = section.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    study_name = section.study or f"{recipe_path.stem}-{fp[:8]}"
    st = _open_study(optuna, storage_url, study_name, fp, direction)
    n_before = len(st.trials)
    start = space.start_point() if section.start_from_recipe else {}
    st.sampler = make_sampler(section.sampler, section.seed + n_before, start)
    if start and n_before == 0:
        st.enqueue_trial(start, user_attrs={"start": True})

    say(f"loading the base {base_recipe.base} …")
    model, tokenizer = load_model_and_tokenizer(base_recipe.base.resolve(), device=options.device,
                                                dtype=options.dtype)
    merger = InPlaceMerger(base_recipe, model)
    score = objective or Objective(section.objective, files, options, tokenizer, metric=section.metric)
    base_tasks: dict[str, dict[str, float]] = {}
    if section.below_base_penalty > 0:
        score, base_tasks = _penalise_below_base(score, model, section.below_base_penalty, direction, say)
    say(f"study {study_name} ({len(space.dims)} parameters, {section.sampler}, {direction}) in {storage_url}; "
        f"{n_before} earlier trial(s); in-place merge: {merger.describe()['mode']}, "
        f"{merger.describe()['tensors']} tensors")

    best_seen: list[float] = []
    try:
        best_seen.append(float(st.best_value))   # a continued study: the best of earlier trials
    except ValueError:
        pass

    trial_fn = _trial_function(space, root, merger, model, score, direction, best_seen, say)

    stopped_by = "trials" if section.trials is not None else "time_limit"
    try:
        st.optimize(trial_fn, n_trials=section.trials, timeout=section.time_limit, catch=(MergelabError,))
        if section.time_limit is not None and time.monotonic() - t_start >= section.time_limit:
            stopped_by = "time_limit"
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        say("interrupted: writing the best trial so far")
    finally:
        merger.restore()

    result = collect(st, out_dir, study_name, storage_url, direction, section, stopped_by,
                     time.monotonic() - t_start, len(st.trials) - n_before)
    result.merger = merger.describe()
    result.base_tasks, result.below_base_penalty = base_tasks, section.below_base_penalty
    result.split_sizes = {s.source.stem: (len(s.search), len(s.check)) for s in splits}
    best_dict = space.recipe_dict(result.best.values)
    result.tuned_recipe = best_dict
    write_outputs(result, recipe_path, section, space)
    return result


def default_gradient_params(recipe) -> dict[str, ParamRange]:
    """``weight`` per expert in [0, 1] with one anchor per layer of the base (at most 64 anchors,
    interpolated in between): layer-wise AdaMerging."""
    reader = CheckpointReader(Path(recipe.base.resolve()))
    try:
        depth = max(layer_depths(reader.keys()).values(), default=0)
    finally:
        reader.close()
    layers = min(depth, 64) if depth >= 2 else None
    return {"weight": ParamRange(low=0.0, high=1.0, layers=layers)}


def _run_gradient(recipe_path: Path, out_dir: Path, recipe_data, section: TuneSection, root: Path, base_recipe,
                  space: SearchSpace, options, say: Callable[[str], None], t_start: float) -> TuneResult:
    """``optimizer: gradient`` (:mod:`mergelab.tune.gradient`): the split, the base loaded once, Adam on
    the search part's entropy; the start and the final point scored on both parts; the same outputs."""

    check_gradient_space(space, base_recipe)
    direction = DIRECTIONS[section.objective]
    splits = load_splits(section.data, section.check_fraction, section.split_seed,
                         section.rows_per_task, section.objective)
    files = _write_splits(out_dir, splits)
    study_name = section.study or f"{recipe_path.stem}-{fingerprint(recipe_data, section)[:8]}"
    say(f"loading the base {base_recipe.base} …")
    model, tokenizer = load_model_and_tokenizer(base_recipe.base.resolve(), device=options.device,
                                                dtype=options.dtype)
    merger = InPlaceMerger(base_recipe, model)
    held = merger.describe()
    merge = LinearMerge(space, root, merger, model)
    score = Objective(section.objective, files, options, tokenizer, metric=section.metric)
    steps = section.steps or DEFAULT_STEPS
    lr = section.learning_rate or DEFAULT_LEARNING_RATE
    say(f"gradient descent on {len(space.dims)} coefficients ({space.method}, Adam lr {lr:g}, {steps} steps); "
        f"{len(merge.terms)} merged tensors ({held['mode']})")

    def record(number: int, values: dict[str, float], seconds: float, start: bool) -> TrialRecord:
        used = {n: round_value(v) for n, v in values.items()}
        merge.write(used)           # the merge the tuned recipe describes (rounded values)
        s, s_tasks = score(model, "search")
        c, c_tasks = score(model, "check")
        return TrialRecord(number, s, c, used, seconds, s_tasks, c_tasks, start)

    try:
        t0 = time.perf_counter()
        first = record(0, start_values(space), 0.0, True)
        say(f"start   search {first.search:.4f}  check {first.check:.4f}")
        t1 = time.perf_counter()
        values, trajectory, stopped_by = learn(merge, tokenizer, files["search"], options, first.values,
                                               steps=steps, learning_rate=lr, time_limit=section.time_limit,
                                               say=say)
        last = record(len(trajectory), values, time.perf_counter() - t1, False)
        first.seconds = t1 - t0
        say(f"final   search {last.search:.4f}  check {last.check:.4f}")
    finally:
        merger.restore()
    trials = [first, last] if last.number > 0 else [first]
    result = TuneResult(out_dir, study_name, "none (gradient descent in memory)", direction, trials[-1], trials,
                        0, stopped_by, outcome_warnings(trials[-1], first, section, direction),
                        time.monotonic() - t_start, len(trajectory), merger=held, optimizer="gradient",
                        trajectory=trajectory)
    result.split_sizes = {s.source.stem: (len(s.search), len(s.check)) for s in splits}
    result.tuned_recipe = space.recipe_dict(result.best.values)
    write_outputs(result, recipe_path, section, space)
    return result


def _penalise_below_base(score, model, penalty: float, direction: str, say: Callable[[str], None]):
    """Score the base (the loaded model before any trial) on both parts; return the objective
    penalised below it (:class:`~mergelab.tune.objective.BelowBasePenalty`) and the base's values."""
    if direction != "maximize":
        raise TuneError("tune.below_base_penalty: a penalty below the base needs a maximised objective "
                        f"(this one is to {direction[:-1]}e)", hint="use objective: score")
    say("scoring the base model on both parts (below_base_penalty) …")
    base = {part: dict(score(model, part)[1]) for part in ("search", "check")}
    if not base["search"]:
        raise TuneError("tune.below_base_penalty: the objective gives no per-task values to compare with "
                        "the base's")
    say("base: " + ", ".join(f"{t} {v:.4f}" for t, v in base["search"].items()) + " (search part); a trial "
        f"loses {penalty:g} × the sum of its shortfalls below these")
    return BelowBasePenalty(score, base, penalty), base


def _write_splits(out_dir: Path, splits) -> dict[str, list[Path]]:
    """Each task's search and check rows written under ``out_dir/split`` (the objective reads them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {"search": [], "check": []}
    for s in splits:
        for part in ("search", "check"):
            f = out_dir / "split" / part / s.source.name
            write_rows(f, getattr(s, part))
            files[part].append(f)
    return files


def _open_study(optuna, storage_url: str, study_name: str, fp: str, direction: str):
    """The study to continue (made for this very search) or a new one."""
    try:
        st = optuna.load_study(study_name=study_name, storage=storage_url)
        known = st.user_attrs.get("fingerprint")
        if known != fp:
            raise TuneError(f"study {study_name!r} in {storage_url} was made for another recipe, search "
                            "space, data or evaluation, so its trials do not compare",
                            hint="use another --study name (or another --out folder)")
        if st.direction.name.lower() != direction:
            raise TuneError(f"study {study_name!r} {st.direction.name.lower()}s its objective, this search "
                            f"would {direction} it", hint="use another --study name")
    except KeyError:
        st = None
    except MergelabError:
        raise
    except Exception as exc:  # a storage URL optuna cannot open
        if "Record does not exist" in str(exc):
            st = None
        else:
            raise TuneError(f"cannot open the study storage {storage_url}: {exc}",
                            hint="give an SQLAlchemy URL such as sqlite:///study.db or "
                                 "postgresql://user@host/db") from None
    if st is None:
        try:
            st = optuna.create_study(storage=storage_url, study_name=study_name, direction=direction,
                                     load_if_exists=True)
        except Exception as exc:
            raise TuneError(f"cannot create the study in {storage_url}: {exc}",
                            hint="give an SQLAlchemy URL such as sqlite:///study.db") from None
        if st.user_attrs.get("fingerprint") is None:
            st.set_user_attr("fingerprint", fp)
    return st


def _trial_function(space: SearchSpace, root: Path, merger, model, score, direction: str,
                    best_seen: list[float], say: Callable[[str], None]):
    """One optuna trial: sample, merge in place, score the search and check parts, report."""

    def trial_fn(trial) -> float:
        t0 = time.perf_counter()
        values = {d.name: trial.suggest_float(d.name, d.low, d.high, log=d.log) for d in space.dims}
        rdict = space.recipe_dict(values)
        try:
            recipe = load_recipe(rdict, base_dir=root)
            merger.apply(recipe)
            s, s_tasks = score(model, "search")
            c, c_tasks = score(model, "check")
        except MergelabError as exc:
            trial.set_user_attr("error", str(exc))
            raise
        if not (math.isfinite(s) and math.isfinite(c)):
            trial.set_user_attr("error", f"objective not finite (search {s}, check {c})")
            raise TuneError(f"trial {trial.number}: the objective is not finite")
        used = {d.name: _used(rdict, d) for d in space.dims}
        seconds = time.perf_counter() - t0
        # one write to the storage (each is a transaction; SQLite commits cost ~10 ms)
        trial.set_user_attr("result", {"check": c, "values": used, "seconds": seconds,
                                       "search_tasks": s_tasks, "check_tasks": c_tasks})
        better = not best_seen or (s > best_seen[0] if direction == "maximize" else s < best_seen[0])
        if better:
            best_seen[:] = [s]
        shown = ", ".join(f"{k}={v:g}" for k, v in used.items())
        say(f"trial {trial.number:>3}  search {s:.4f}  check {c:.4f}  {seconds:5.1f} s  "
            f"{'★ ' if better else ''}{shown}")
        return s

    return trial_fn


def _used(rdict: dict, d) -> float:
    """The value a dimension got in the recipe (after rounding)."""

    return round_value(_lookup(rdict, d))


def _lookup(rdict: dict, d) -> float:
    v = (rdict["method"] if d.expert is None else rdict["experts"][d.expert])[d.key]
    if d.group is not None:
        v = next(e["value"] for e in v if e.get("filter") == d.group)
    if d.layer is not None:
        v = v[d.layer]
    return float(v)


def collect(st, out_dir: Path, study_name: str, storage_url: str, direction: str, section: TuneSection,
            stopped_by: str, seconds: float, new_trials: int) -> TuneResult:
    """Every finished trial of the study (all workers), the best by the search objective, warnings."""
    import optuna

    done, failed = [], 0
    for t in st.get_trials(deepcopy=False):
        res = t.user_attrs.get("result")
        if t.state == optuna.trial.TrialState.COMPLETE and isinstance(res, dict):
            done.append(TrialRecord(t.number, float(t.value), float(res["check"]), dict(res["values"]),
                                    float(res.get("seconds", 0.0)), dict(res.get("search_tasks", {})),
                                    dict(res.get("check_tasks", {})), bool(t.user_attrs.get("start"))))
        elif t.state == optuna.trial.TrialState.FAIL:
            failed += 1
    if not done:
        errors = [t.user_attrs.get("error") for t in st.trials if t.user_attrs.get("error")]
        raise TuneError(f"no trial of study {study_name!r} finished"
                        + (f"; the first failure: {errors[0]}" if errors else
                           (" (interrupted)" if stopped_by == "interrupted" else "")))
    sign = 1 if direction == "maximize" else -1
    best = max(done, key=lambda r: (sign * r.search, -r.number))
    warnings = outcome_warnings(best, next((r for r in done if r.start), None), section, direction)
    if failed:
        warnings.append(f"{failed} trial(s) failed (see trials.csv / the study storage for their errors)")
    constant = constant_tasks(done)
    warnings += [constant_task_warning(t, v, len(done), direction) for t, v in constant.items()]
    return TuneResult(out_dir, study_name, storage_url, direction, best, sorted(done, key=lambda r: r.number),
                      failed, stopped_by, warnings, seconds, new_trials, constant_tasks=constant)


def outcome_warnings(best: TrialRecord, start: TrialRecord | None, section: TuneSection,
                     direction: str) -> list[str]:
    """What the winner's scores warn of: a search/check gap above ``divergence``, and doing worse
    on the check part than the recipe's own parameters (``start``)."""
    sign = 1 if direction == "maximize" else -1
    warnings = []
    gap = best.gap(direction)
    if gap > section.divergence:
        warnings.append(
            f"the winner (trial {best.number}) is {gap:.3f} better on the search part ({best.search:.4f}) than "
            f"on the check part ({best.check:.4f}), more than the divergence threshold {section.divergence:g}: "
            "its parameters may fit the search rows rather than the tasks; prefer more validation "
            "rows, fewer searched parameters or narrower ranges")
    if start is not None and start is not best and sign * (best.check - start.check) < 0:
        warnings.append(
            f"on the check part the winner ({best.check:.4f}) does worse than the recipe's own parameters "
            f"(trial {start.number}: {start.check:.4f}): the search did not generalise beyond its rows")
    return warnings


def constant_tasks(trials: list[TrialRecord]) -> dict[str, float]:
    """The tasks whose search-part value is the same in every trial (at least two trials): the
    search cannot see them, whatever their parameters. ``{task: that value}``, in task order."""
    if len(trials) < 2:
        return {}
    out = {}
    for task in trials[0].search_tasks:
        values = [t.search_tasks.get(task) for t in trials]
        if any(v is None for v in values):
            continue
        if max(values) - min(values) <= 1e-12:
            out[task] = float(values[0])
    return out


def constant_task_warning(task: str, value: float, n_trials: int, direction: str) -> str:
    """What a user reads about a task that scored ``value`` in each of ``n_trials`` trials."""
    text = (f"task {task!r} scored {value:.4f} on the search part in every one of the {n_trials} trials: "
            "the search could not see it (no trial changed its score), so the winner was chosen by the "
            "other tasks alone; ")
    if direction == "maximize" and value <= 0.0:
        return text + ("check how that task is scored: for a generation task its stop strings (eval option "
                       "`stop`) and `max_new_tokens` (an answer followed by more text never matches), and "
                       "tune.metric (exact_match is 0 unless the whole output matches the target; rougeL "
                       "gives partial credit); for any task, that its targets are right")
    if direction == "maximize" and value >= 1.0:
        return text + "every trial already scores it perfectly, so it cannot tell the trials apart"
    return text + ("check its rows: with few search rows a score moves in coarse steps (give more rows "
                   "or a finer tune.metric), and see that its targets and prompts are what the task needs")


# ------------------------------------------------------------------------------------- outputs


def write_outputs(result: TuneResult, recipe_path: Path, section: TuneSection, space: SearchSpace) -> None:
    import yaml

    out, best = result.out_dir, result.best
    n_check = sum(c for _, c in result.split_sizes.values())
    if n_check and n_check < 20:
        result.warnings.append(
            f"the check part has only {n_check} rows, so its score moves in steps of about "
            f"{1 / n_check:.2f}: read the search/check gap with that in mind")
    header = (f"# Tuned by `mergelab tune {recipe_path.name}`: study {result.study_name}, trial {best.number}\n"
              f"# search {best.search:.4f}, check {best.check:.4f} ({result.direction}); see report.md\n")
    atomic_write(out / TUNED_RECIPE, header + yaml.safe_dump(_plain(result.tuned_recipe), sort_keys=False,
                                                              allow_unicode=True))
    names = space.names
    rows = [["trial", "search", "check", "gap", "seconds", "start", *names]]
    for r in result.trials:
        rows.append([r.number, f"{r.search:.6f}", f"{r.check:.6f}", f"{r.gap(result.direction):.6f}",
                     f"{r.seconds:.2f}", int(r.start), *[r.values.get(n, "") for n in names]])
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write(out / TRIALS_CSV, buf.getvalue())
    atomic_write(out / REPORT, _report(result, recipe_path, section, names))
    atomic_write(out / REPORT_HTML, report_html(result, recipe_path, section, names))
    _plot(result, out / PLOT)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


def _report(r: TuneResult, recipe_path: Path, section: TuneSection, names: list[str]) -> str:
    best = r.best
    complete = len(r.trials)
    total_s = sum(t.seconds for t in r.trials)
    per_min = 60 * complete / total_s if total_s > 0 else float("nan")
    to_best = sum(t.seconds for t in r.trials if t.number <= best.number)
    lines = [f"# mergelab tune: {recipe_path.name}", "",
             f"- study **{r.study_name}** in `{r.storage}`; objective **{_objective_text(r, section)}** "
             f"({r.direction}), {_search_text(r, section)}",
             *([f"- this invocation: {r.new_trials} step(s) in {r.seconds:.0f} s, stopped by **{r.stopped_by}** "
                f"(budget: steps {section.steps or DEFAULT_STEPS}, time limit "
                f"{'none' if section.time_limit is None else f'{section.time_limit:g} s'}); trial 0 is the "
                "starting point, the other the final one"] if r.optimizer == "gradient" else
               [f"- this invocation: {r.new_trials} trial(s) in {r.seconds:.0f} s, stopped by **{r.stopped_by}** "
                f"(budget: trials {section.trials}, time limit "
                f"{'none' if section.time_limit is None else f'{section.time_limit:g} s'})",
                f"- study: {complete} finished trial(s), {r.failed} failed; {per_min:.1f} trials/min; "
                f"{to_best:.0f} s of trial time up to the winner"]),
             f"- in-place merge: {r.merger.get('mode')} ({r.merger.get('tensors')} tensors, "
             f"{r.merger.get('held_bytes', 0) / 2**20:.1f} MiB kept)",
             "- validation rows (search / check): "
             + ", ".join(f"{k} {s}/{c}" for k, (s, c) in r.split_sizes.items()),
             "", f"## Winner: trial {best.number}", "",
             f"search **{best.search:.4f}**, check **{best.check:.4f}**, gap {best.gap(r.direction):+.4f} "
             f"(warning above {section.divergence:g})", "",
             "| parameter | value |", "|---|---|"]
    lines += [f"| `{n}` | {best.values.get(n)} |" for n in names]
    headers, rows = _task_rows(r)
    if rows:
        lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join("–" if c is None else f"{c:.4f}" if isinstance(c, float) else str(c)
                                    for c in row) + " |" for row in rows]
    if r.constant_tasks:
        lines += ["", "## Tasks the search could not see", "",
                  ("Each scored the same on the search part in every trial, so no parameter moved it "
                   "(see the warnings)."), "", "| task | value in every trial |", "|---|---|"]
        lines += [f"| {t} | {v:.4f} |" for t, v in r.constant_tasks.items()]
    lines += ["", "The tuned recipe is `recipe.tuned.yaml`; `mergelab run recipe.tuned.yaml --out RUN` "
              "reproduces this merge.", "", "## Warnings", ""]
    lines += [f"- ⚠ {w}" for w in r.warnings] or ["none"]
    lines += ["", "## Trials", "", "| trial | search | check | gap | s | " + " | ".join(f"`{n}`" for n in names) + " |",
              "|" + "---|" * (5 + len(names))]
    for t in r.trials:
        mark = " ★" if t is best else (" (recipe)" if t.start else "")
        lines.append(f"| {t.number}{mark} | {t.search:.4f} | {t.check:.4f} | {t.gap(r.direction):+.4f} | "
                     f"{t.seconds:.1f} | " + " | ".join(str(t.values.get(n, "")) for n in names) + " |")
    if r.trajectory:
        lines += ["", "## Loss per step (search part, before the step)", "", "| step | entropy |", "|---|---|"]
        lines += [f"| {i} | {v:.6f} |" for i, v in enumerate(r.trajectory)]
    lines += ["", "![search](search.png)", ""]
    return "\n".join(lines)


def _search_text(r: TuneResult, section: TuneSection) -> str:
    if r.optimizer == "gradient":
        return (f"optimizer gradient (Adam, learning rate {section.learning_rate or DEFAULT_LEARNING_RATE:g}, "
                "every search row each step)")
    return f"sampler {section.sampler} (seed {section.seed})"


def _objective_text(r: TuneResult, section: TuneSection) -> str:
    if not r.below_base_penalty:
        return section.objective
    return (f"{section.objective} − {r.below_base_penalty:g} × Σ max(0, base − merge) over tasks "
            "(below_base_penalty)")


def _task_rows(r: TuneResult) -> tuple[list[str], list[list[Any]]]:
    """The winner's value per task on each part (None where a part lacks the task), beside the
    base's where it was scored, with ``below base (…)`` where the winner falls under it."""
    best = r.best
    tasks = sorted(set(best.search_tasks) | set(best.check_tasks))
    if not r.base_tasks:
        return ["task", "search", "check"], [[t, best.search_tasks.get(t), best.check_tasks.get(t)] for t in tasks]
    rows = []
    for t in tasks:
        s, c = best.search_tasks.get(t), best.check_tasks.get(t)
        base_s, base_c = r.base_tasks["search"].get(t), r.base_tasks["check"].get(t)
        below = [part for part, v, b in (("search", s, base_s), ("check", c, base_c))
                 if v is not None and b is not None and v < b]
        rows.append([t, s, base_s, c, base_c, f"below base ({', '.join(below)})" if below else ""])
    return ["task", "search", "base (search)", "check", "base (check)", "vs base"], rows


def search_curve(r: TuneResult) -> list[tuple[int, float]]:
    """``(trial, best search value so far)`` for every finished trial, in trial order."""
    out, running = [], None
    for t in r.trials:
        if running is None or (t.search > running if r.direction == "maximize" else t.search < running):
            running = t.search
        out.append((t.number, running))
    return out


def report_html(r: TuneResult, recipe_path: Path, section: TuneSection, names: list[str]) -> str:
    """``report.html``: the search curve (inline SVG), the winner and every trial, on one static page."""
    best = r.best
    chart = h.scatter_chart(
        {"search part (objective)": [(t.number, t.search) for t in r.trials],
         "check part (held out)": [(t.number, t.check) for t in r.trials]},
        steps={"best search so far": search_curve(r)}, marker_x=best.number,
        marker_label=f"winner (trial {best.number})", title=f"search curve: {r.study_name}", x_label="trial",
        y_label="objective" + (" (higher is better)" if r.direction == "maximize" else " (lower is better)"),
        id="searchchart")
    winner = [h.para(f"trial {best.number}: search {best.search:.4f}, check {best.check:.4f}, gap "
                     f"{best.gap(r.direction):+.4f} (warning above {section.divergence:g})"),
              h.table(["parameter", "value"], [[n, best.values.get(n)] for n in names], id="winner")]
    headers, rows = _task_rows(r)
    if rows:
        winner.append(h.table(headers, rows, id="winnertasks",
                              row_classes=["bad" if row[-1].startswith("below") else "" for row in rows]
                              if r.base_tasks else None))
    unseen = []
    if r.constant_tasks:
        unseen = [h.section("Tasks the search could not see",
                            h.para("Each scored the same on the search part in every trial, so no parameter "
                                   "moved it (see the warnings).", "bad"),
                            h.table(["task", "value in every trial"], [[t, v] for t, v in r.constant_tasks.items()],
                                    id="constanttasks"), id="unseen")]
    trials = [[t.number, t.search, t.check, t.gap(r.direction), t.seconds, *[t.values.get(n) for n in names]]
              for t in r.trials]
    classes = ["best" if t is best else "" for t in r.trials]
    return h.page(f"mergelab tune: {recipe_path.name}", [
        *([h.section("Warnings", *[h.para(w, "bad") for w in r.warnings], id="warnings")] if r.warnings else []),
        h.section("Search", chart,
                  h.para(f"study {r.study_name}; objective {_objective_text(r, section)} ({r.direction}), "
                         f"{_search_text(r, section)}; this invocation: {r.new_trials} trial(s) in "
                         f"{r.seconds:.0f} s, stopped by {r.stopped_by}; {len(r.trials)} finished trial(s) in the "
                         f"study, {r.failed} failed"), id="search"),
        h.section(f"Winner: trial {best.number}", *winner,
                  h.para("The tuned recipe is recipe.tuned.yaml; mergelab run recipe.tuned.yaml --out RUN "
                         "reproduces this merge."), id="best"),
        *unseen,
        *([h.section("Loss per step", h.scatter_chart(
            {"entropy (search part)": list(enumerate(r.trajectory))}, title="gradient descent", x_label="step",
            y_label="entropy (lower is better)", id="losschart"), id="loss")] if r.trajectory else []),
        h.section("Trials", h.table(["trial", "search", "check", "gap", "seconds", *names], trials, id="trials",
                                    row_classes=classes), id="alltrials"),
    ], subtitle=f"storage {r.storage}")


def _plot(r: TuneResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [t.number for t in r.trials]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.scatter(xs, [t.search for t in r.trials], s=18, label="search part (objective)")
    ax.scatter(xs, [t.check for t in r.trials], s=18, marker="x", label="check part (held out)")
    best, running = [], None
    for t in r.trials:
        if running is None or (t.search > running if r.direction == "maximize" else t.search < running):
            running = t.search
        best.append(running)
    ax.step(xs, best, where="post", color="grey", linewidth=1, label="best search so far")
    ax.axvline(r.best.number, color="green", linestyle=":", linewidth=1, label=f"winner (trial {r.best.number})")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective" + (" (higher is better)" if r.direction == "maximize" else " (lower is better)"))
    ax.set_title(f"mergelab tune: {r.study_name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


__all__ = ["run_tune", "TuneResult", "TrialRecord", "collect", "make_sampler"]
