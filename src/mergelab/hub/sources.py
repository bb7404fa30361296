"""Model sources: a recipe's model reference → a local folder, pinned to one commit.

A reference is any object with the attributes ``path``, ``model`` and ``revision`` (the recipe's
``ModelRef``; a plain ``dict`` with those keys works too):

* ``path: /some/folder`` — a local model folder, used as it is;
* ``model: org/name`` + ``revision: <branch | tag | 40-hex sha | cutoff>`` — a Hugging Face Hub
  repository. A branch or tag is resolved to its commit sha first and that sha is what is
  downloaded and recorded; ``revision: cutoff`` means the last commit on or before the
  competition's cut-off date (2024-05-31 23:59:59 UTC unless told otherwise).

Hub downloads go through ``huggingface_hub.snapshot_download`` into the usual Hub cache
(``HF_HUB_CACHE``) and fetch only what merging needs: safetensors weights (never pickle), the
index, configs, tokenizer files, chat template and adapter files — see :func:`select_files`.

Every Hub failure becomes one :class:`~mergelab.errors.SourceError` subclass that says what went
wrong and what to do: :class:`HubNotFoundError` (repo or revision), :class:`HubAccessError`
(gated, private, bad token), :class:`HubUnreachableError` (network, ``HF_ENDPOINT``, timeout,
offline mode), :class:`HubResponseError` (an answer that is not the Hub's) and
:class:`PickleOnlyError`.

``MERGELAB_HUB_TIMEOUT`` (seconds, default 10) is the time allowed for one whole Hub operation —
resolving a revision (with the commit listing it needs), reading safetensors headers, reading a
small file — not for each read: a server that trickles its answer is cut off at the deadline
(:mod:`mergelab.hub.deadline`). A snapshot download gets that time plus one second per megabyte
to download (:data:`DOWNLOAD_MIN_RATE`).
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from mergelab.errors import CheckpointError, SourceError
from mergelab.hub import deadline as hub_deadline

log = logging.getLogger(__name__)

#: The competition's cut-off: models must be uploaded on or before this instant (UTC).
DEFAULT_CUTOFF = datetime(2024, 5, 31, 23, 59, 59, tzinfo=timezone.utc)
#: The ``revision`` value that asks for the last commit on or before the cut-off.
CUTOFF_REVISION = "cutoff"
DEFAULT_TIMEOUT = 10.0
#: A snapshot download may take MERGELAB_HUB_TIMEOUT plus its size at this rate (bytes per second).
DOWNLOAD_MIN_RATE = 1_000_000

#: Files (at the repository root) that merging and evaluation need besides the weights.
NEEDED_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "adapter_config.json", "adapter_model.safetensors",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SHA = re.compile(r"[0-9a-f]{40}")


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
class HubNotFoundError(SourceError):
    """The repository (or the requested revision of it) does not exist for us on the Hub."""


class NoCommitBeforeCutoffError(HubNotFoundError):
    """The repository has no commit on or before the cut-off (it was uploaded later)."""


class HubAccessError(SourceError):
    """The Hub refuses access: gated repo without accepted licence, or a rejected token."""


class HubUnreachableError(SourceError):
    """The Hub cannot be reached: no network, wrong ``HF_ENDPOINT``, timeout or offline mode."""


class HubResponseError(SourceError):
    """The endpoint answered, but not like the Hub does (malformed JSON, HTTP 5xx, odd headers)."""


class PickleOnlyError(SourceError):
    """The repository has pickle weights only; mergelab reads safetensors only."""


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubCommit:
    sha: str
    date: datetime
    title: str = ""


@dataclass(frozen=True)
class HubModel:
    """What the Hub says about a repository at one commit (no file is downloaded)."""

    repo: str
    requested_revision: str
    sha: str
    commit_date: datetime
    created_at: datetime | None
    private: bool
    gated: bool | str  # False, "auto" or "manual"
    card: dict = field(default_factory=dict)  # model card metadata (license, license_name, base_model...)
    files: tuple[str, ...] = ()
    hub_parameters: int | None = None  # the Hub's own count, available even for gated repos
    sizes: dict = field(default_factory=dict)  # file name -> bytes, where the Hub says


@dataclass(frozen=True)
class ResolvedRef:
    """A model reference resolved to a folder; what the run manifest records about a model."""

    source: str  # "local" or "hub"
    local_path: Path | None
    repo: str | None = None
    requested_revision: str | None = None
    commit_sha: str | None = None
    commit_date: datetime | None = None
    files: tuple[str, ...] = ()
    from_cache_only: bool = False  # the Hub was unreachable; a complete cached snapshot was used
    license: str | None = None  # the licence in the Hub's model card metadata (hub refs; None: not stated)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["local_path"] = str(self.local_path) if self.local_path else None
        out["commit_date"] = _iso(self.commit_date) if self.commit_date else None
        out["files"] = list(self.files)
        return out


def parse_cutoff(value: str | date | datetime | None) -> datetime:
    """A cut-off as an aware UTC datetime. A bare date means the end of that day (inclusive).

    ``None`` → :data:`DEFAULT_CUTOFF`; ``"2024-05-31"`` → 2024-05-31 23:59:59 UTC;
    ``"2024-05-31T12:00:00Z"`` → that instant; naive times are taken as UTC.
    """
    if value is None:
        return DEFAULT_CUTOFF
    if isinstance(value, str):
        text = value.strip()
        try:
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
                value = date.fromisoformat(text)
            else:
                value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise SourceError(f"cut-off {value!r} is not a date",
                              hint="write it as YYYY-MM-DD (end of that day, UTC) or an ISO time, "
                                   "e.g. 2024-05-31T23:59:59Z") from None
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    return datetime.combine(value, time(23, 59, 59), tzinfo=timezone.utc)


def select_files(files) -> list[str]:
    """The files of a repository that mergelab downloads, in sorted order.

    Root-level safetensors weights (shards, ``model.safetensors``, ``adapter_model.safetensors``),
    plus :data:`NEEDED_FILES`. Mistral-style ``consolidated*.safetensors`` duplicates are left out
    when other safetensors weights are there; pickle weights, READMEs, sub-folders (``original/``,
    ONNX exports...) and anything else are never fetched.
    """
    root = [f for f in files if "/" not in f]
    weights = [f for f in root if f.endswith(".safetensors")]
    if any(not f.startswith("consolidated") for f in weights):
        weights = [f for f in weights if not f.startswith("consolidated")]
    return sorted(set(weights) | {f for f in root if f in NEEDED_FILES})


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def card_licence(card: dict | None) -> str | None:
    """The licence id in model card metadata, lower-cased (``other`` + ``license_name`` → that name), or None."""
    card = card or {}
    value = card.get("license")
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else ", ".join(map(str, value))
    if not value:
        return None
    value = str(value).strip().lower()
    if value == "other" and card.get("license_name"):
        return str(card["license_name"]).strip().lower()
    return value


def ref_fields(ref) -> tuple[str | None, str | None, str | None]:
    """``(path, model, revision)`` of a model reference (an object with those attributes, or a dict)."""
    if isinstance(ref, dict):
        return ref.get("path"), ref.get("model"), ref.get("revision")
    return getattr(ref, "path", None), getattr(ref, "model", None), getattr(ref, "revision", None)


def describe_ref(ref) -> str:
    """``org/name@rev`` or the local path, for messages and tables."""
    path, model, revision = ref_fields(ref)
    if path is not None:
        return str(path)
    return f"{model}@{revision or 'main'}"


# ------------------------------------------------------------------------------------------------
# The Hub client
# ------------------------------------------------------------------------------------------------
_LOCAL_HINT = "or download the model elsewhere and put `path: /local/folder` in the recipe instead of `model:`"


def _parse_timeout(value) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise SourceError(f"MERGELAB_HUB_TIMEOUT must be a number of seconds above 0 (got {value!r})",
                          hint="e.g. MERGELAB_HUB_TIMEOUT=30: the time allowed for one whole Hub operation")
    return seconds


def _transport_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(timeout errors, other transport errors) of the HTTP library huggingface_hub uses."""
    timeouts: list[type] = [TimeoutError]
    transport: list[type] = [ConnectionError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            module = __import__(name)
            timeouts.append(module.TimeoutException)
            transport.append(module.TransportError)
    return tuple(timeouts), tuple(transport)


class HubClient:
    """One connection setting to the Hub: endpoint, token and the time allowed for one operation.

    ``endpoint`` defaults to ``HF_ENDPOINT`` read *now* (``huggingface_hub`` reads it once at
    import), ``timeout`` to ``MERGELAB_HUB_TIMEOUT`` (seconds, default 10): the total time of each
    public method call (an operation), whatever the server does. Every method raises a
    :class:`~mergelab.errors.SourceError` subclass on failure.
    """

    def __init__(self, endpoint: str | None = None, token: str | bool | None = None,
                 timeout: float | None = None):
        from huggingface_hub import HfApi, constants

        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.timeout = _parse_timeout(timeout if timeout is not None
                                      else os.environ.get("MERGELAB_HUB_TIMEOUT") or DEFAULT_TIMEOUT)
        self.token = token
        self.api = HfApi(endpoint=self.endpoint, token=token)
        hub_deadline.install()
        self._operations: list[tuple[float, str]] = []  # (seconds allowed, what it does), outermost first

    @contextlib.contextmanager
    def operation(self, seconds: float | None = None, doing: str = "looking up") -> Iterator[None]:
        """One Hub operation: all its traffic ends within ``seconds`` (default: ``self.timeout``).

        A nested operation keeps the outer deadline when that one is earlier.
        """
        allowed = self.timeout if seconds is None else seconds
        self._operations.append((allowed, doing))
        try:
            with hub_deadline.deadline(allowed):
                yield
        finally:
            self._operations.pop()

    def _deadline_error(self, what: str, local_hint: str) -> HubUnreachableError:
        allowed, doing = self._operations[0] if self._operations else (self.timeout, "looking up")
        extra = "" if allowed == self.timeout else ": MERGELAB_HUB_TIMEOUT plus 1 s per MB to download"
        return HubUnreachableError(
            f"the Hub at {self.endpoint} did not answer within {allowed:g} s ({doing} {what}{extra})",
            hint=f"MERGELAB_HUB_TIMEOUT (now {self.timeout:g} s) is the time allowed for one whole Hub operation: "
                 f"check your network and HF_ENDPOINT (now {self.endpoint}), raise MERGELAB_HUB_TIMEOUT for a slow "
                 f"link, or retry later; {local_hint}")

    # -- error translation -----------------------------------------------------------------------
    @contextlib.contextmanager
    def errors(self, repo: str, revision: str | None = None) -> Iterator[None]:
        """Turn whatever ``huggingface_hub`` / the HTTP layer raises into one clear SourceError.

        A failure after the operation's deadline passed is reported as the deadline, whatever
        ``huggingface_hub`` wrapped it in (e.g. "cannot find the file in the local cache").
        """
        what = f"'{repo}'" + (f" at revision '{revision}'" if revision else "")
        try:
            with self._translated(what, repo, revision):
                yield
        except (HubNotFoundError, HubAccessError):
            raise
        except Exception:
            left = hub_deadline.remaining()
            if left is not None and left <= 0:
                raise self._deadline_error(what, _LOCAL_HINT) from None
            raise

    @contextlib.contextmanager
    def _translated(self, what: str, repo: str, revision: str | None) -> Iterator[None]:
        from huggingface_hub import errors as hf

        timeouts, transport = _transport_errors()
        local_hint = _LOCAL_HINT
        try:
            yield
        except SourceError:
            raise
        except hub_deadline.HubDeadlineExceeded:
            raise self._deadline_error(what, local_hint) from None
        except hf.OfflineModeIsEnabled:
            raise HubUnreachableError(
                f"cannot look up {what}: offline mode is on (HF_HUB_OFFLINE=1)",
                hint=f"unset HF_HUB_OFFLINE to reach {self.endpoint}, {local_hint}") from None
        except hf.GatedRepoError:
            raise HubAccessError(
                f"{what} is gated: its files need an accepted licence and a token",
                hint=f"accept the licence at {self.endpoint}/{repo}, then log in (`hf auth login`) or set HF_TOKEN"
            ) from None
        except hf.RevisionNotFoundError:
            raise HubNotFoundError(
                f"revision '{revision}' does not exist in Hub repository '{repo}'",
                hint="use an existing branch, tag or full 40-character commit sha, or `revision: cutoff` for the "
                     "last commit on or before the cut-off") from None
        except hf.RepositoryNotFoundError:
            raise HubNotFoundError(
                f"Hub repository '{repo}' was not found at {self.endpoint} "
                "(it does not exist, or it is private and your token cannot see it)",
                hint=f"check the name (namespace/name); for a private repo log in or set HF_TOKEN; {local_hint}"
            ) from None
        except hf.RemoteEntryNotFoundError as exc:
            raise HubNotFoundError(f"a file of {what} is missing on the Hub: {exc.response.url}",
                                   hint="pin another revision of the repository") from None
        except hf.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 401:
                raise HubAccessError(f"the Hub at {self.endpoint} rejected the token sent for {what}",
                                     hint="check HF_TOKEN or log in again (`hf auth login`)") from None
            if status == 403:
                raise HubAccessError(f"access to {what} is forbidden for your token",
                                     hint=f"request access at {self.endpoint}/{repo} or use a token with read "
                                          "permission") from None
            raise HubResponseError(f"the Hub at {self.endpoint} answered HTTP {status} for {what}",
                                   hint="the Hub may be down: retry later, or check HF_ENDPOINT") from None
        except (hf.SafetensorsParsingError, hf.NotASafetensorsRepoError) as exc:
            raise SourceError(f"cannot read the safetensors headers of {what}: {exc}",
                              hint="the weights may be corrupt or not safetensors; pin another revision") from None
        except hf.HFValidationError as exc:
            raise SourceError(f"'{repo}' is not a valid Hub repository id: {exc}",
                              hint="write it as namespace/name, e.g. mistralai/Mistral-7B-v0.1") from None
        except hf.LocalEntryNotFoundError as exc:  # snapshot_download when the Hub vanished mid-way
            raise HubUnreachableError(f"cannot download {what} from {self.endpoint}: {exc}",
                                      hint=f"check your network and HF_ENDPOINT, {local_hint}") from None
        except timeouts:
            raise self._deadline_error(what, local_hint) from None
        except transport as exc:
            raise HubUnreachableError(
                f"cannot connect to the Hub at {self.endpoint} (looking up {what}): {exc}",
                hint=f"check your network and HF_ENDPOINT (now {self.endpoint}); {local_hint}") from None
        except (ValueError, KeyError, TypeError) as exc:  # JSON that is not the Hub's
            raise HubResponseError(
                f"the server at {self.endpoint} gave an answer that is not the Hub's for {what} "
                f"({type(exc).__name__}: {exc})",
                hint="check that HF_ENDPOINT points to a Hugging Face Hub (or mirror), not a web page or proxy"
            ) from None

    # -- metadata --------------------------------------------------------------------------------
    def commits(self, repo: str, revision: str = "main") -> Iterator[HubCommit]:
        """Commits reachable from ``revision``, newest first, fetched page by page as consumed.

        ``HfApi.list_repo_commits`` is not used because it takes no timeout (a stalled Hub would
        hang it forever) and reads every page even when only the first commit is wanted.
        """
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
        from huggingface_hub.utils import parse_datetime, validate_repo_id

        with self.errors(repo, revision):
            validate_repo_id(repo)  # the id goes into a URL path
        url: str | None = f"{self.endpoint}/api/models/{repo}/commits/{quote(revision, safe='')}"
        headers = build_hf_headers(token=self.token)
        while url:
            with self.operation(), self.errors(repo, revision):  # one page at a time: never held across a yield
                response = get_session().get(url, headers=headers, timeout=self.timeout)
                hf_raise_for_status(response)
                page = [HubCommit(item["id"], parse_datetime(item["date"]), item.get("title", ""))
                        for item in response.json()]
                url = response.links.get("next", {}).get("url")
            yield from page

    def commit_on_or_before(self, repo: str, cutoff: datetime, branch: str = "main") -> HubCommit:
        """The last commit of ``branch`` dated on or before ``cutoff``."""
        oldest = None
        with self.operation():
            commits = self.commits(repo, branch)
            try:
                for commit in commits:
                    if commit.date <= cutoff:
                        return commit
                    oldest = commit
            finally:
                commits.close()
        first = f" (its first commit is dated {_iso(oldest.date)})" if oldest else ""
        raise NoCommitBeforeCutoffError(
            f"'{repo}' has no commit on or before the cut-off {_iso(cutoff)}{first}",
            hint="the model was uploaded after the cut-off: pick another model, or a later --cutoff if your "
                 "rules allow it")

    def model(self, repo: str, revision: str | None = None, *, cutoff: datetime | None = None) -> HubModel:
        """Metadata of ``repo`` at ``revision`` (branch, tag, sha or ``"cutoff"``), sha resolved."""
        with self.operation():
            return self._model(repo, revision, cutoff)

    def _model(self, repo: str, revision: str | None, cutoff: datetime | None) -> HubModel:
        requested = revision or "main"
        if requested == CUTOFF_REVISION:
            pinned = self.commit_on_or_before(repo, parse_cutoff(cutoff))
            revision = pinned.sha
        with self.errors(repo, requested):
            info = self.api.model_info(repo, revision=revision, timeout=self.timeout, files_metadata=True)
            sha = info.sha
            if not isinstance(sha, str) or not _SHA.fullmatch(sha):
                raise ValueError(f"model info has no commit sha (sha={sha!r})")
        if requested == CUTOFF_REVISION:
            commit = pinned
        else:
            commits = self.commits(repo, sha)
            commit = next(commits, None)
            commits.close()
            if commit is None or commit.sha != sha:
                raise HubResponseError(f"the Hub listed no commit {sha} for '{repo}'",
                                       hint="check that HF_ENDPOINT points to a Hugging Face Hub")
        card = info.card_data.to_dict() if info.card_data is not None else {}
        return HubModel(
            repo=repo, requested_revision=requested, sha=sha, commit_date=commit.date,
            created_at=info.created_at, private=bool(info.private), gated=info.gated or False, card=card,
            files=tuple(s.rfilename for s in info.siblings or ()),
            hub_parameters=info.safetensors.total if info.safetensors else None,
            sizes={s.rfilename: s.size for s in info.siblings or () if isinstance(s.size, int)},
        )

    def parameter_count(self, model: HubModel) -> int:
        """Parameters of ``model``, counted from its safetensors headers over HTTP range requests.

        No weights are downloaded: ``huggingface_hub`` reads the first bytes of each file (and the
        shard index). Raises :class:`PickleOnlyError` without safetensors weights and
        :class:`HubAccessError` for a gated repo without access.
        """
        return sum(math.prod(shape) for shape in self.tensor_shapes(model).values())

    def tensor_shapes(self, model: HubModel) -> dict[str, tuple[int, ...]]:
        """``{tensor name: shape}`` of ``model``'s safetensors weights, from their headers over HTTP
        range requests (as :meth:`parameter_count`; no weights are downloaded)."""
        weights = [f for f in select_files(model.files) if f.endswith(".safetensors")]
        if not weights:
            raise _pickle_or_empty(model)
        with self.operation(doing="reading the safetensors headers of"), self.errors(model.repo, model.sha), \
                _quiet_progress():
            if "model.safetensors" in model.files or "model.safetensors.index.json" in model.files:
                files = self.api.get_safetensors_metadata(model.repo, revision=model.sha,
                                                          timeout=self.timeout).files_metadata.values()
            else:
                files = [self.api.parse_safetensors_file_metadata(model.repo, name, revision=model.sha,
                                                                  timeout=self.timeout) for name in weights]
            return {name: tuple(int(d) for d in info.shape) for f in files for name, info in f.tensors.items()}

    def read_json(self, model: HubModel, filename: str, cache_dir: str | Path | None = None) -> dict:
        """A small JSON file of ``model`` at its pinned commit (e.g. ``adapter_config.json``)."""
        from huggingface_hub import hf_hub_download

        with self.operation(doing=f"reading {filename} of"), self.errors(model.repo, model.sha):
            path = hf_hub_download(model.repo, filename, revision=model.sha, endpoint=self.endpoint,
                                   token=self.token, cache_dir=cache_dir, etag_timeout=self.timeout)
            return json.loads(Path(path).read_text())

    def download(self, model: HubModel, cache_dir: str | Path | None = None) -> tuple[Path, tuple[str, ...]]:
        """Download what :func:`select_files` picks of ``model`` at its sha; (snapshot folder, files)."""
        from huggingface_hub import snapshot_download

        files = select_files(model.files)
        if not any(f.endswith(".safetensors") for f in files):
            raise _pickle_or_empty(model)
        size = sum(model.sizes.get(f, 0) for f in files)
        with self.operation(self.timeout + size / DOWNLOAD_MIN_RATE, doing="downloading"), \
                self.errors(model.repo, model.sha):
            folder = snapshot_download(
                model.repo, revision=model.sha, cache_dir=cache_dir, endpoint=self.endpoint, token=self.token,
                allow_patterns=[glob.escape(f) for f in files], etag_timeout=self.timeout,
            )
        return Path(folder), tuple(files)

    def cached_snapshot(self, repo: str, sha: str, cache_dir: str | Path | None = None) -> Path | None:
        """A complete cached snapshot of ``repo`` at ``sha`` (no network), or None."""
        from huggingface_hub import get_cached_repo_tree, snapshot_download

        try:  # the tree listing cached by the first download tells which files a complete snapshot has
            files = select_files(f.path for f in get_cached_repo_tree(repo, revision=sha, cache_dir=cache_dir))
            return Path(snapshot_download(repo, revision=sha, cache_dir=cache_dir, local_files_only=True,
                                          allow_patterns=[glob.escape(f) for f in files]))
        except Exception as exc:  # noqa: BLE001 - any cache problem means "not usable offline"
            log.debug("no usable cached snapshot of %s@%s: %s", repo, sha, exc)
            return None


def _pickle_or_empty(model: HubModel) -> SourceError:
    pickles = sorted(f for f in model.files if f.endswith(PICKLE_SUFFIXES))
    where = f"'{model.repo}' at {model.sha[:12]}"
    if pickles:
        return PickleOnlyError(
            f"{where} has pickle weights only ({', '.join(pickles[:3])}{'...' if len(pickles) > 3 else ''}); "
            "mergelab reads safetensors only (loading pickle can run arbitrary code)",
            hint="look for a revision with .safetensors (the Hub's conversion bot often opens one as "
                 "refs/pr/N: `revision: refs/pr/N`), or convert the weights yourself and use `path:`")
    return SourceError(f"{where} has no model weights (no .safetensors file at the repository root)",
                       hint="check the repository name and revision")


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence huggingface_hub's progress bars for header reads (restored afterwards)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


# ------------------------------------------------------------------------------------------------
# Resolution of recipe references
# ------------------------------------------------------------------------------------------------
def resolve_ref(ref, *, cache_dir: str | Path | None = None, cutoff: str | datetime | None = None,
                download: bool = True, client: HubClient | None = None) -> ResolvedRef:
    """Resolve a model reference to a local folder pinned to a commit (see the module doc).

    ``cache_dir`` overrides the Hub cache; ``cutoff`` is used by ``revision: cutoff``;
    ``download=False`` only resolves the commit (``local_path`` is then None for Hub refs).
    When the Hub cannot be reached, a reference pinned to a full commit sha is served from a
    complete cached snapshot if there is one (``from_cache_only=True``).
    """
    path, model, revision = ref_fields(ref)
    if (path is None) == (model is None):
        raise SourceError(f"a model reference needs exactly one of `path` or `model` (got path={path!r}, "
                          f"model={model!r})")
    if path is not None:
        folder = Path(path).expanduser().resolve()
        if not folder.is_dir():
            raise CheckpointError(
                f"local model folder not found: {folder}" if not folder.exists()
                else f"local model path is not a folder: {folder}",
                hint="check the path (a relative path counts from the current directory), or use `model:` and "
                     "`revision:` for a Hub repository")
        files = tuple(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))
        return ResolvedRef("local", folder, files=files)

    client = client or HubClient()
    try:
        info = client.model(model, revision, cutoff=parse_cutoff(cutoff))
    except HubUnreachableError:
        cached = client.cached_snapshot(model, revision, cache_dir) if revision and _SHA.fullmatch(revision) else None
        if cached is None:
            raise
        log.warning("the Hub is unreachable; using the cached snapshot of %s at %s", model, revision)
        files = tuple(sorted(p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()))
        return ResolvedRef("hub", cached, model, revision, revision, None, files, from_cache_only=True)
    licence = card_licence(info.card)
    if not download:
        return ResolvedRef("hub", None, model, info.requested_revision, info.sha, info.commit_date,
                           tuple(select_files(info.files)), license=licence)
    folder, files = client.download(info, cache_dir)
    return ResolvedRef("hub", folder, model, info.requested_revision, info.sha, info.commit_date, files,
                       license=licence)


def resolve_model(ref, *, cache_dir: str | Path | None = None, cutoff: str | datetime | None = None) -> Path:
    """The local folder of a model reference (downloading a Hub repo at its pinned commit)."""
    return resolve_ref(ref, cache_dir=cache_dir, cutoff=cutoff).local_path
