"""The competition's model rules as checks that return findings.

An entry may use only model weights that are (1) public on the Hugging Face Hub, (2) uploaded on
or before the cut-off (2024-05-31 23:59:59 UTC by default), (3) at most 8 billion parameters, and
(4) open. For every model of a recipe — the base, each expert, and the base that each LoRA adapter
names in its ``adapter_config.json`` — :func:`check_models` asks the Hub (through
``huggingface_hub``, never downloading weights) and returns a :class:`Report` with one
:class:`Finding` per model and rule:

==============  ================================================================================
rule            what is checked
==============  ================================================================================
``available``   the repo exists and is public (private → violation; gated → ok, with a note
                that its licence must be accepted)
``date``        the repo's creation date *and* the pinned revision's commit date are on or
                before the cut-off
``params``      parameters counted from the safetensors headers (HTTP range requests) are at
                most ``max_params``; up to ``params_tolerance`` above it is a warning (the
                competition names Llama-3-8B, 8.03B, and Gemma-7B, 8.54B, as allowed families).
                For a layer stack (``slices``) the *result* is counted too, tensor by tensor from
                the slices' headers (:func:`~mergelab.io.layers.plan_stack`): 2 × 32 layers of an
                8B model make a 15B model, which breaks the rule although each input keeps it
``licence``     the model card's licence is on the open allow-list (ok), a custom open-weight
                licence such as llama3 or gemma (ok, with a note), or missing/unknown (warn)
==============  ================================================================================

Statuses: ``ok``, ``warn`` (allowed, but look), ``violation`` and ``unverifiable`` (a local folder,
or headers that cannot be read). A report passes when it has neither violations nor unverifiable
findings. When the check itself cannot run (Hub unreachable, timeout, answers that are not the
Hub's, a rejected token) :class:`~mergelab.errors.RuleCheckError` is raised instead.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from mergelab.errors import RuleCheckError, SourceError
from mergelab.io.layers import plan_stack
from mergelab.hub.sources import (CUTOFF_REVISION, HubAccessError, HubClient, HubModel, HubNotFoundError, HubResponseError, HubUnreachableError, NoCommitBeforeCutoffError, PickleOnlyError, ref_fields, describe_ref, parse_cutoff)

OK, WARN, VIOLATION, UNVERIFIABLE = "ok", "warn", "violation", "unverifiable"
FAILING = (VIOLATION, UNVERIFIABLE)
RULES = ("available", "date", "params", "licence")
DEFAULT_MAX_PARAMS = 8_000_000_000
DEFAULT_PARAMS_TOLERANCE = 0.10

#: Licence ids (as the Hub spells them in model card metadata) that are open.
OPEN_LICENCES = frozenset({
    "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "isc", "zlib",
    "unlicense", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "odc-by", "odbl", "pddl", "mpl-2.0", "epl-2.0", "ecl-2.0", "afl-3.0", "artistic-2.0",
    "bsl-1.0", "gpl-2.0", "gpl-3.0", "lgpl-2.1", "lgpl-3.0", "agpl-3.0", "openrail", "openrail++",
    "bigscience-openrail-m", "creativeml-openrail-m", "bigcode-openrail-m", "bigscience-bloom-rail-1.0",
    "llama2-openrail", "postgresql", "wtfpl", "ms-pl", "osl-3.0",
})
#: Custom licences of open-weight model families: allowed, with their own terms to accept.
OPEN_WEIGHT_LICENCES = frozenset({"llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma"})

#: Hub repos known to be newer than the default cut-off (for notes on local folders that name them).
KNOWN_TOO_NEW = {"HuggingFaceTB/SmolLM2": "SmolLM2 was published in October/November 2024, after the cut-off"}


class RulesNotMetError(RuleCheckError):
    """The check ran and some model breaks a rule (exit status 1, unlike a check that cannot run)."""

    exit_code = 1


@dataclass(frozen=True)
class Finding:
    """One rule applied to one model."""

    model: str  # "org/name@revision" or a local path
    role: str  # "base", "expert 2", "base named by expert 2"
    rule: str  # one of RULES
    status: str  # ok | warn | violation | unverifiable
    reason: str


@dataclass
class Report:
    """The findings of a rule check, plus what was learnt about each model (for --json)."""

    cutoff: datetime
    max_params: int
    findings: list[Finding] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.status in FAILING]

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "cutoff": _iso(self.cutoff), "max_params": self.max_params,
                "findings": [asdict(f) for f in self.findings], "models": self.models}

    def require_pass(self) -> None:
        """Raise :class:`RulesNotMetError` saying in words what failed and what to do (``mergelab run``)."""
        if not self.ok:
            message, hint = explain_failures(self)
            raise RulesNotMetError(message, hint=hint)


#: What each rule asks, in words (for messages).
RULE_WORDS = {"available": "public on the Hub", "date": "uploaded on or before the cut-off",
              "params": "size", "licence": "licence"}


def explain_failures(report: Report) -> tuple[str, str]:
    """``(message, hint)`` for a report that does not pass: what could not be verified or broke a rule, and why.

    One line per model (its path or ``org/name@revision`` whole, never cut), saying in words what
    failed. A local folder gets one sentence: it has no Hub upload date and no public
    availability to check, so it cannot be verified — the fix is a Hub reference pinned to a
    commit (or ``--no-rules`` outside the competition).
    """
    by_model: dict[tuple[str, str], list[Finding]] = {}
    for f in report.failures:
        by_model.setdefault((f.model, f.role), []).append(f)
    local = {key for key, found in by_model.items()
             if any(f.rule == "available" and f.status == UNVERIFIABLE and f.reason.startswith("local folder")
                    for f in found)}
    lines = []
    for (model, role), found in by_model.items():
        if (model, role) in local:
            what = ("a local folder: its Hub upload date and public availability cannot be verified "
                    "(only a Hub repository has them)")
            rest = [f for f in found if f.rule not in ("available", "date")]
        else:
            what, rest = "", found
        words = [f"{RULE_WORDS.get(f.rule, f.rule)} ({'cannot be verified' if f.status == UNVERIFIABLE else 'violated'})"
                 f": {f.reason}" for f in rest]
        lines.append(f"  - {role}: {model}\n      " + "\n      ".join(([what] if what else []) + words))
    n_local = len(local)
    n_rules = len(by_model) - n_local
    parts = ([f"{n_local} local folder{'s' if n_local > 1 else ''} cannot be verified"] if n_local else []) + (
        [f"{n_rules} model{'s' if n_rules > 1 else ''} break{'' if n_rules > 1 else 's'} or cannot be checked "
         "against a rule"] if n_rules else [])
    message = (f"the recipe does not pass the competition rules ({' and '.join(parts)}):\n" + "\n".join(lines))
    fixes = []
    if n_local:
        fixes.append("for a competition entry, use Hub references pinned to a commit "
                     "(`model: org/name` with `revision: cutoff` or a 40-character commit sha) instead of `path:`")
    if n_rules:
        fixes.append("fix the models named above (`mergelab check RECIPE` shows every rule; docs/rules.md explains "
                     "them)")
    fixes.append("or pass --no-rules for a run outside the competition")
    return message, "; ".join(fixes)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _when(value: datetime, cutoff: datetime) -> str:
    """The date, with the time of day when it falls on the cut-off's day (where it decides)."""
    same_day = value.date() == cutoff.date()
    return value.strftime("%Y-%m-%d %H:%M:%S UTC" if same_day else "%Y-%m-%d")


def format_limit(n: int) -> str:
    """``8B``, ``7.5B``, ``500M``: a parameter limit, short."""
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M"


def format_params(n: int) -> str:
    """``8.03B (8,030,261,248)``, ``135M (134,515,008)``."""
    short = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:,}"
    return f"{short} ({n:,})"


def classify_licence(card: dict) -> tuple[str, str]:
    """(status, reason) for the licence in a model card's metadata."""
    licence = card.get("license")
    if isinstance(licence, list):
        licence = licence[0] if len(licence) == 1 else ", ".join(map(str, licence))
    name = card.get("license_name")
    if not licence:
        return WARN, "no licence in the model card metadata: check the repository's terms"
    key = str(licence).lower()
    if key == "other" and name:
        key = str(name).lower()
    if key in OPEN_LICENCES:
        return OK, f"{key} (open licence)"
    if key in OPEN_WEIGHT_LICENCES:
        return OK, f"{key} (custom open-weight licence: allowed; accept its terms)"
    shown = f"other ({name})" if str(licence).lower() == "other" and name else str(licence)
    return WARN, (f"licence '{shown}' is not on mergelab's open list: check that the competition accepts it "
                  "(see docs/rules.md)")


class _Checker:
    def __init__(self, client: HubClient, cutoff: datetime, max_params: int, tolerance: float):
        self.client, self.cutoff, self.max_params, self.tolerance = client, cutoff, max_params, tolerance
        self.report = Report(cutoff, max_params)
        self.seen: set[tuple[str, str]] = set()  # (repo or path, requested revision)
        self.recipe_repos: set[str] = set()
        self.pending: list[tuple[str, str]] = []  # (role, repo) of adapter bases still to check

    def add(self, model: str, role: str, rule: str, status: str, reason: str) -> None:
        self.report.findings.append(Finding(model, role, rule, status, reason))

    # -- parameters --------------------------------------------------------------------------------
    def judge_params(self, n: int, how: str) -> tuple[str, str]:
        limit = format_limit(self.max_params)
        if n <= self.max_params:
            return OK, f"{format_params(n)} parameters {how}, at most {limit}"
        over = n / self.max_params - 1
        if over <= self.tolerance:
            like = ", like Llama-3-8B's 8.03B" if limit == "8B" else ""
            return WARN, (f"{format_params(n)} parameters {how}: {over:.1%} above {limit}; allowed as a "
                          f"nominal-{limit} model (within {self.tolerance:.0%}{like}), confirm with the organisers "
                          "if unsure")
        return VIOLATION, f"{format_params(n)} parameters {how}: more than {limit}"

    # -- Hub models --------------------------------------------------------------------------------
    def hub(self, role: str, repo: str, revision: str | None) -> None:
        key = (repo, revision or "main")
        if key in self.seen:
            return
        self.seen.add(key)
        label = f"{repo}@{revision or 'main'}"
        try:
            model = self.client.model(repo, revision, cutoff=self.cutoff)
        except NoCommitBeforeCutoffError as exc:
            self.add(label, role, "date", VIOLATION, exc.message)
            return
        except HubNotFoundError as exc:
            self.add(label, role, "available", VIOLATION, exc.message)
            return
        if model.requested_revision != model.sha:
            label = f"{repo}@{model.requested_revision} ({model.sha[:12]})"
        facts: dict[str, Any] = {
            "model": label, "role": role, "source": "hub", "repo": repo,
            "requested_revision": model.requested_revision, "commit_sha": model.sha,
            "commit_date": _iso(model.commit_date), "created_at": _iso(model.created_at),
            "private": model.private, "gated": model.gated, "licence": model.card.get("license"),
            "parameters": None,
        }
        self.report.models.append(facts)
        self.available(label, role, model)
        self.date(label, role, model)
        facts["parameters"] = self.params(label, role, model)
        self.add(label, role, "licence", *classify_licence(model.card))

    def available(self, label: str, role: str, model: HubModel) -> None:
        if model.private:
            self.add(label, role, "available", VIOLATION,
                     "private repository: the competition allows public Hub models only")
        elif model.gated:
            self.add(label, role, "available", OK,
                     f"public, gated: accept its licence at {self.client.endpoint}/{model.repo} and use a token "
                     "(HF_TOKEN) to download it")
        else:
            self.add(label, role, "available", OK, "public")

    def date(self, label: str, role: str, model: HubModel) -> None:
        cutoff, when = _iso(self.cutoff), (lambda d: _when(d, self.cutoff))
        if model.created_at is not None and model.created_at > self.cutoff:
            self.add(label, role, "date", VIOLATION, f"repository created {when(model.created_at)}, after the cut-off "
                                                     f"{cutoff}")
            return
        commit = f"commit {model.sha[:12]} of {when(model.commit_date)}"
        if model.commit_date > self.cutoff:
            try:
                older = self.client.commit_on_or_before(model.repo, self.cutoff)
                fix = f"pin `revision: cutoff` (commit {older.sha[:12]} of {when(older.date)}) or an older commit"
            except NoCommitBeforeCutoffError:
                fix = "its default branch has no commit on or before the cut-off"
            self.add(label, role, "date", VIOLATION,
                     f"revision '{model.requested_revision}' is {commit}, after the cut-off {cutoff}: {fix}")
            return
        created = f"created {when(model.created_at)}" if model.created_at else "creation date not reported"
        self.add(label, role, "date", OK, f"{created}; {commit}")

    def params(self, label: str, role: str, model: HubModel) -> int | None:
        try:
            n = self.client.parameter_count(model)
            how = "(safetensors headers)"
        except PickleOnlyError:
            self.add(label, role, "params", UNVERIFIABLE,
                     "no safetensors weights (pickle only): cannot be counted from headers, nor merged by mergelab")
            return None
        except HubAccessError:
            if model.hub_parameters is None:
                self.add(label, role, "params", UNVERIFIABLE,
                         f"gated: its headers need an accepted licence and a token ({self.client.endpoint}/"
                         f"{model.repo}), and the Hub reports no parameter count")
                return None
            n, how = model.hub_parameters, "(the Hub's count: the headers are gated)"
        except (HubUnreachableError, HubResponseError):
            raise  # the check cannot run (see check_models)
        except SourceError as exc:
            self.add(label, role, "params", UNVERIFIABLE, exc.message)
            return None
        if "adapter_config.json" in model.files:
            self.adapter(label, role, n, self._adapter_config(model))
            return n
        self.add(label, role, "params", *self.judge_params(n, how))
        return n

    def _adapter_config(self, model: HubModel) -> dict:
        try:
            return self.client.read_json(model, "adapter_config.json")
        except (HubUnreachableError, HubResponseError):
            raise
        except SourceError:
            return {}

    def adapter(self, label: str, role: str, n: int, config: dict) -> None:
        """An adapter's size is its base's: report the adapter and check the base it names."""
        base = config.get("base_model_name_or_path")
        if not base:
            self.add(label, role, "params", UNVERIFIABLE,
                     f"adapter, {format_params(n)} parameters; its adapter_config.json names no base model")
            return
        base = str(base)
        if base.startswith(("/", ".", "~")) or Path(base).expanduser().exists():
            self.add(label, role, "params", UNVERIFIABLE,
                     f"adapter, {format_params(n)} parameters; its base is a local folder ({base}) that cannot be "
                     "verified on the Hub")
            return
        if base in self.recipe_repos:
            self.add(label, role, "params", OK,
                     f"adapter, {format_params(n)} parameters; its base {base} is in the recipe, checked there")
            return
        self.add(label, role, "params", OK,
                 f"adapter, {format_params(n)} parameters; its base {base} is checked below, at its last commit on "
                 "or before the cut-off (an adapter does not pin its base's revision)")
        self.pending.append((f"base named by {role}", base))

    # -- a layer stack's result --------------------------------------------------------------------
    def stack(self, parts: list[tuple[Any, int, int]]) -> None:
        """The model stacked from ``parts`` (``(model ref, start, end)`` per slice), counted from the
        slices' headers: one ``params`` finding with the role ``result``."""
        layers = sum(end - start for _, start, end in parts)
        label = f"the stacked model ({layers} layers from {len(parts)} slice{'s' if len(parts) > 1 else ''})"
        shapes: dict[tuple, dict] = {}
        for i, (ref, _, _) in enumerate(parts, 1):
            key = ref_fields(ref)
            if key in shapes:
                continue
            try:
                shapes[key] = self._tensor_shapes(*key)
            except (HubUnreachableError, HubResponseError):
                raise  # the check cannot run (see check_models)
            except SourceError as exc:
                self.add(label, "result", "params", UNVERIFIABLE,
                         f"slice {i}'s model {describe_ref(ref)} cannot be counted layer by layer: {exc.message}")
                return
        layout = plan_stack([(shapes[ref_fields(ref)], start, end) for ref, start, end in parts],
                            [f"slices[{i}] ({describe_ref(ref)})" for i, (ref, _, _) in enumerate(parts)])
        n = layout.parameters
        self.add(label, "result", "params", *self.judge_params(n, "(the slices' layers, from safetensors headers)"))
        self.report.models.append({"model": label, "role": "result", "source": "slices", "parameters": n,
                                   "layers": len(layout.layers)})

    def _tensor_shapes(self, path: str | None, model: str | None, revision: str | None) -> dict:
        if path is not None:
            shapes = _local_tensor_shapes(Path(path).expanduser().resolve())
            if shapes is None:
                raise SourceError(f"{path} has no safetensors weights")
            return shapes
        hub_model = self.client.model(model, revision, cutoff=self.cutoff)
        if "adapter_config.json" in hub_model.files:
            raise SourceError("it is a LoRA adapter; a slice copies the layers of a full model")
        return self.client.tensor_shapes(hub_model)

    # -- local folders -----------------------------------------------------------------------------
    def local(self, role: str, path: str) -> None:
        folder = Path(path).expanduser().resolve()
        label = str(folder)
        if (label, "") in self.seen:
            return
        self.seen.add((label, ""))
        if not folder.is_dir():
            self.add(label, role, "available", VIOLATION, "local folder not found")
            return
        named = _named_repo(folder)
        known = next((why for prefix, why in KNOWN_TOO_NEW.items() if named and named.startswith(prefix)), None)
        note = f"; its files name {named}" + (f" ({known}: not competition-legal)" if known else "") if named else ""
        self.add(label, role, "available", UNVERIFIABLE,
                 f"local folder: cannot be verified; a competition entry uses Hub models (`model:` + `revision:`){note}")
        self.add(label, role, "date", UNVERIFIABLE, "a local folder has no upload date")
        config = _read_json(folder / "adapter_config.json")
        n = _local_parameters(folder)
        if n is None:
            self.add(label, role, "params", UNVERIFIABLE, "no safetensors weights to count")
        elif config is not None:
            self.adapter(label, role, n, config)
        else:
            self.add(label, role, "params", *self.judge_params(n, "(local safetensors headers)"))
        self.report.models.append({"model": label, "role": role, "source": "local", "named_repo": named,
                                   "parameters": n})
        card = _front_matter(folder / "README.md")
        self.add(label, role, "licence", *classify_licence(card or {}))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _front_matter(readme: Path) -> dict | None:
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return None
    parts = text.split("---", 2)
    if not text.startswith("---") or len(parts) < 3:
        return None
    try:
        data = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _named_repo(folder: Path) -> str | None:
    """A Hub repo id that a local folder's files name (config ``_name_or_path``, card ``base_model``)."""
    candidates = [(_read_json(folder / "config.json") or {}).get("_name_or_path"),
                  (_read_json(folder / "adapter_config.json") or {}).get("base_model_name_or_path")]
    base_model = (_front_matter(folder / "README.md") or {}).get("base_model")
    candidates += base_model if isinstance(base_model, list) else [base_model]
    return next((c for c in candidates if isinstance(c, str) and _HUB_ID.fullmatch(c)), None)


def _local_weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if any(not f.name.startswith("consolidated") for f in files):
        files = [f for f in files if not f.name.startswith("consolidated")]
    return files


def _local_parameters(folder: Path) -> int | None:
    """Parameters declared by the safetensors headers of a local folder (None without any)."""
    from huggingface_hub import parse_local_safetensors_file_metadata

    files = _local_weight_files(folder)
    if not files:
        return None
    return sum(sum(parse_local_safetensors_file_metadata(f).parameter_count.values()) for f in files)


def _local_tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """``{tensor name: shape}`` from the safetensors headers of a local folder (None without any)."""
    from huggingface_hub import parse_local_safetensors_file_metadata

    if (folder / "adapter_config.json").is_file():
        raise SourceError("it is a LoRA adapter; a slice copies the layers of a full model")
    files = _local_weight_files(folder)
    if not files:
        return None
    return {name: tuple(int(d) for d in info.shape)
            for f in files for name, info in parse_local_safetensors_file_metadata(f).tensors.items()}


def check_models(refs: Iterable, *, cutoff: str | datetime | None = None, max_params: float = DEFAULT_MAX_PARAMS,
                 params_tolerance: float = DEFAULT_PARAMS_TOLERANCE, client: HubClient | None = None,
                 stack: list[tuple[Any, int, int]] | None = None) -> Report:
    """Check model references against the competition rules.

    ``refs`` holds model references (objects or dicts with ``path`` / ``model`` / ``revision``) or
    ``(role, ref)`` pairs; roles name the rows of the report ("base", "expert 1"...). ``stack``
    (:func:`recipe_stack`): the slices of a layer stack, whose result is counted too (role
    ``result``). Raises :class:`RuleCheckError` when the check cannot run, and the recipe error
    of a layer range that its model does not have.
    """
    pairs = [r if isinstance(r, tuple) else (f"model {i}", r) for i, r in enumerate(refs, 1)]
    checker = _Checker(client or HubClient(), parse_cutoff(cutoff), int(max_params), params_tolerance)
    checker.recipe_repos = {m for _, r in pairs if (m := ref_fields(r)[1])}
    try:
        for role, ref in pairs:
            path, model, revision = ref_fields(ref)
            if (path is None) == (model is None):
                raise RuleCheckError(f"{role}: {describe_ref(ref)} needs exactly one of `path` or `model`")
            if path is not None:
                checker.local(role, str(path))
            else:
                checker.hub(role, model, revision)
            while checker.pending:  # the bases that adapters name, right after their adapter
                base_role, base = checker.pending.pop(0)
                checker.hub(base_role, base, CUTOFF_REVISION)
        if stack:
            checker.stack(list(stack))
    except (HubUnreachableError, HubResponseError, HubAccessError) as exc:
        # the Hub cannot answer (or refuses our token): no verdict is possible
        raise RuleCheckError(f"the rule check could not run: {exc.message}", hint=exc.hint) from None
    return checker.report


def recipe_refs(recipe) -> list[tuple[str, Any]]:
    """``[("base", ref), ("expert 1", ref), ...]`` of a recipe object (or a dict read from YAML)."""
    get = (lambda k: recipe.get(k)) if isinstance(recipe, dict) else (lambda k: getattr(recipe, k, None))
    pairs = [("base", get("base"))] if get("base") is not None else []
    pairs += [(f"expert {i}", e) for i, e in enumerate(get("experts") or [], 1)]
    pairs += [(f"slice {i}", s) for i, s in enumerate(get("slices") or [], 1)]
    return pairs


def recipe_stack(recipe) -> list[tuple[Any, int, int]] | None:
    """``[(model ref, start, end), ...]`` of a layer stack's slices (None for a recipe without
    ``slices``): what :func:`check_models` counts the result from."""
    slices = recipe.get("slices") if isinstance(recipe, dict) else getattr(recipe, "slices", None)
    if not slices:
        return None
    out = []
    for s in slices:
        start, end = s["layer_range"] if isinstance(s, dict) else s.layer_range
        out.append((s, int(start), int(end)))
    return out


def report_table(report: Report):
    """The report as a rich table: one row per model and rule.

    Nothing is cut: a model's reference (a Hub id with its revision, or a path) folds onto more
    lines when its column is narrow, reasons wrap at spaces; rule and status names stay whole.
    """
    from rich.markup import escape
    from rich.table import Table

    colours = {OK: "green", WARN: "yellow", VIOLATION: "bold red", UNVERIFIABLE: "magenta"}
    table = Table(title=f"Competition rules: cut-off {_iso(report.cutoff)}, at most "
                        f"{format_limit(report.max_params)} parameters", title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("rule", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("reason", overflow="fold")
    previous = None
    for f in report.findings:
        first = (f.model, f.role) != previous
        if first and previous is not None:
            table.add_section()
        model = f"{escape(f.model)}\n[dim]{escape(f.role)}[/]" if first else ""
        table.add_row(model, f.rule, f"[{colours[f.status]}]{f.status}[/]", escape(f.reason))
        previous = (f.model, f.role)
    return table
