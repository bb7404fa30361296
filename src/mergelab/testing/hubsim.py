"""A small local imitation of the Hugging Face Hub API, for tests (never the real Hub).

It serves, from an in-memory description of repositories, the endpoints that ``huggingface_hub``
2.x calls for what mergelab does (resolving revisions, downloading snapshots, listing commits and
reading safetensors headers)::

    GET  /api/models/{repo}                      model info at the default branch
    GET  /api/models/{repo}/revision/{rev}       model info at a revision
    GET  /api/models/{repo}/tree/{rev}[/{path}]  file listing (paginated, ``?p=N``)
    GET  /api/models/{repo}/commits/{rev}        commits, newest first (paginated, ``?p=N``)
    HEAD /{repo}/resolve/{rev}/{file}            file metadata (X-Repo-Commit, ETag, X-Linked-*)
    GET  /{repo}/resolve/{rev}/{file}            file bytes, honouring ``Range: bytes=a-b``

Errors have the Hub's shape: status 401/403/404 with an ``X-Error-Code`` header
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``) that ``huggingface_hub``
turns into its typed exceptions. :meth:`HubSim.set_fault` makes the server hang (to test
timeouts), trickle its answers one byte at a time (to test the overall deadline), answer
malformed JSON or fail with HTTP 500. Every request is logged in
:attr:`HubSim.requests`, so a test can assert what was (not) fetched.

Usage::

    repo = Repo("org/model", [Commit({"config.json": b"{}"}, date="2024-01-02")],
                card_data={"license": "apache-2.0"})
    with HubSim([repo]) as hub, hub.environ(cache_dir=tmp_path / "cache"):
        huggingface_hub.HfApi().model_info("org/model")       # talks to 127.0.0.1

Repositories have a linear history (``Commit`` objects oldest first, each holding the complete
file set at that commit); branches and tags (``refs``) name a commit by its index.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Iterator, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

# Files stored with git LFS on the Hub: they get an ``lfs`` entry in listings and the X-Linked-* headers.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".model")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def _utc(value: str | datetime) -> datetime:
    """A date (``"2024-05-01"``, an ISO time or a datetime) as an aware UTC datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _iso(value: datetime) -> str:
    """The Hub's date format: ``2024-05-01T12:00:00.000Z``."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid`` / ETag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def safetensors_header(tensors: Mapping[str, tuple[str, list[int]]], metadata: dict | None = None) -> bytes:
    """A *header-only* safetensors file: the real 8-byte length and JSON header, no tensor data.

    ``tensors`` maps a name to ``(dtype, shape)`` (dtype as safetensors spells it: ``"BF16"``,
    ``"F32"``...). Data offsets are laid out as in a real file, so a reader of the header (e.g.
    ``huggingface_hub.get_safetensors_metadata`` over HTTP range requests) sees a model of any
    size while the file is a few hundred bytes.
    """
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = 1
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n * sizes[dtype]]}
        offset += n * sizes[dtype]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to a multiple of 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _parameter_counts(data: bytes) -> dict[str, int]:
    """Parameters per dtype declared by a safetensors file's header ({} when it is not one)."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
    except (struct.error, ValueError):
        return {}
    counts: dict[str, int] = {}
    for name, info in header.items():
        if name != "__metadata__":
            n = 1
            for dim in info["shape"]:
                n *= dim
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + n
    return counts


def files_from_folder(folder: str | Path) -> dict[str, bytes]:
    """All files under ``folder`` as ``{relative posix path: bytes}`` (to publish a local model)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Commit:
    """One commit: the complete set of files of the repository after it, and its date."""

    files: dict[str, bytes]
    date: str | datetime
    title: str = "Upload files"
    sha: str = ""  # filled in by Repo (deterministic)


@dataclass
class Repo:
    """A model repository: linear history (oldest commit first), visibility, card metadata.

    ``created_at`` defaults to the first commit's date; ``refs`` maps branch and tag names to a
    commit index (``main`` defaults to the last commit); ``card_data`` is what the Hub parses from
    the README front matter (``{"license": "apache-2.0"}``); ``gated`` is ``False``, ``"auto"`` or
    ``"manual"``.
    """

    repo_id: str
    commits: list[Commit]
    created_at: str | datetime | None = None
    private: bool = False
    gated: bool | str = False
    card_data: dict | None = None
    refs: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.commits:
            raise ValueError(f"repo {self.repo_id} needs at least one commit")
        for i, commit in enumerate(self.commits):
            commit.date = _utc(commit.date)
            if not commit.sha:
                digest = hashlib.sha1(f"{self.repo_id}\0{i}\0{commit.date.isoformat()}\0{commit.title}".encode())
                for name in sorted(commit.files):
                    digest.update(f"\0{name}\0{git_blob_sha1(commit.files[name])}".encode())
                commit.sha = digest.hexdigest()
        self.created_at = _utc(self.created_at) if self.created_at else self.commits[0].date
        self.refs = {"main": len(self.commits) - 1, **self.refs}

    def commit_index(self, revision: str) -> int | None:
        """The index of the commit a branch, tag or full sha names (None if it names none)."""
        if revision in self.refs:
            return self.refs[revision]
        return next((i for i, c in enumerate(self.commits) if c.sha == revision), None)


@dataclass
class LoggedRequest:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    range: str | None
    authorization: str | None


class HubSim:
    """A threaded HTTP server on 127.0.0.1 (random port) imitating the Hub for ``repos``.

    ``tokens`` are the access tokens the server accepts; a request with a valid token may read
    private and gated repositories, one with any other token gets the Hub's 401 "Invalid
    credentials". ``page_size`` is the page length of the commit and tree listings.
    """

    def __init__(self, repos: Iterable[Repo] = (), *, tokens: Iterable[str] = (), page_size: int = 50):
        self.repos: dict[str, Repo] = {}
        for repo in repos:
            self.add(repo)
        self.tokens = set(tokens)
        self.page_size = page_size
        self.requests: list[LoggedRequest] = []
        self._fault: tuple[str, str | None] | None = None
        self.trickle_interval = 3.0
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up --------------------------------------------------------------------------------
    def add(self, repo: Repo) -> Repo:
        self.repos[repo.repo_id] = repo
        return repo

    def set_fault(self, kind: str | None, path_contains: str | None = None, *, interval: float = 3.0) -> None:
        """Misbehave on requests whose path contains ``path_contains`` (all when None).

        ``kind``: ``"hang"`` (never answer, until the server stops), ``"trickle"`` (send the right
        answer, status line first, one byte every ``interval`` seconds: each read gets a byte long
        before a per-read timeout, so only an overall deadline stops the client), ``"malformed"``
        (HTTP 200 with a body that is not JSON), ``"500"`` (internal error), or None to behave again.
        """
        if kind not in (None, "hang", "trickle", "malformed", "500"):
            raise ValueError(f"unknown fault {kind!r}")
        self._fault = None if kind is None else (kind, path_contains)
        self.trickle_interval = interval

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HubSim is not running: use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fetched(self, method: str = "GET") -> list[str]:
        """Paths of the files served by ``/resolve/`` with ``method``, in request order."""
        out = []
        for r in self.requests:
            if r.method == method and "/resolve/" in r.path:
                out.append(unquote(r.path.split("/resolve/", 1)[1].split("/", 1)[1]))
        return out

    def __enter__(self) -> "HubSim":
        handler = type("_BoundHandler", (_Handler,), {"sim": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hubsim", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # releases hanging handlers
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None

    @contextlib.contextmanager
    def environ(self, cache_dir: str | Path | None = None) -> Iterator["HubSim"]:
        """Point ``huggingface_hub`` at this server for the duration of the block.

        Sets ``HF_ENDPOINT`` (and ``huggingface_hub.constants.ENDPOINT``, which is read once at
        import time), turns offline mode off (the test suite turns it on), drops any ``HF_TOKEN``
        and, when given, points the Hub cache (``HF_HUB_CACHE``) at ``cache_dir``. Everything is
        restored on exit.
        """
        from huggingface_hub import constants

        saved_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE")}
        names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_OFFLINE", "HF_HUB_CACHE")
        saved_constants = {k: getattr(constants, k) for k in names}
        os.environ["HF_ENDPOINT"] = self.url
        os.environ["HF_HUB_OFFLINE"] = "0"
        os.environ.pop("HF_TOKEN", None)
        constants.ENDPOINT = self.url
        constants.HUGGINGFACE_CO_URL_TEMPLATE = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HUB_OFFLINE = False
        if cache_dir is not None:
            os.environ["HF_HUB_CACHE"] = str(cache_dir)
            constants.HF_HUB_CACHE = str(cache_dir)
        try:
            yield self
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            for key, value in saved_constants.items():
                setattr(constants, key, value)


class _Answer(Exception):
    """Raised inside the handler to send an error response in the Hub's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class _Handler(BaseHTTPRequestHandler):
    sim: HubSim  # bound by HubSim.__enter__

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    # -- plumbing ------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        sim = self.sim
        sim.requests.append(LoggedRequest(method, parts.path, query, self.headers.get("Range"),
                                          self.headers.get("Authorization")))
        fault = sim._fault
        if fault is not None and (fault[1] is None or fault[1] in parts.path):
            if fault[0] == "hang":
                sim._stop.wait(120)
                self.close_connection = True
                return
            if fault[0] == "trickle":
                return self._trickle(method, parts.path, query)
            if fault[0] == "500":
                return self._error(_Answer(500, "Internal Error"))
            if fault[0] == "malformed" and parts.path.startswith("/api/"):
                return self._send(200, b"<html>Service temporarily unavailable</html>", "application/json")
        self._answer(method, parts.path, query)

    def _trickle(self, method: str, path: str, query: dict) -> None:
        """Write the right answer one byte per ``sim.trickle_interval`` s, until done or the server stops."""
        wire, self.wfile = self.wfile, io.BytesIO()
        try:
            self._answer(method, path, query)
            data = self.wfile.getvalue()
        finally:
            self.wfile = wire
        self.close_connection = True
        for i in range(len(data)):
            if self.sim._stop.wait(self.sim.trickle_interval):
                return
            try:
                wire.write(data[i:i + 1])
                wire.flush()
            except OSError:  # the client gave up
                return

    def _answer(self, method: str, path: str, query: dict) -> None:
        try:
            segments = [unquote(s) for s in path.strip("/").split("/")]
            if segments[:2] == ["api", "models"] and method == "GET":
                self._api(segments[2:], query)
            elif "resolve" in segments:
                self._resolve(method, segments)
            else:
                raise _Answer(404, "Not Found")
        except _Answer as answer:
            self._error(answer)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, headers: dict | None = None) -> None:
        self._send(200, json.dumps(data).encode(), "application/json; charset=utf-8", headers)

    def _error(self, answer: _Answer) -> None:
        headers = {"X-Error-Message": answer.message}
        if answer.code:
            headers["X-Error-Code"] = answer.code
        if answer.commit:
            headers["X-Repo-Commit"] = answer.commit
        self._send(answer.status, json.dumps({"error": answer.message}).encode(), "application/json", headers)

    # -- access rules ----------------------------------------------------------------------------
    def _repo(self, segments: list[str], files: bool) -> tuple[Repo, list[str]]:
        """Find the repo named by the leading segments; apply the Hub's visibility rules."""
        sim = self.sim
        auth = self.headers.get("Authorization")
        token = auth.split(" ", 1)[1] if auth and " " in auth else None
        if token is not None and token not in sim.tokens:
            raise _Answer(401, "Invalid credentials in Authorization header")
        for n in (2, 1):  # "namespace/name", or a legacy name without namespace
            repo = sim.repos.get("/".join(segments[:n]))
            if repo is not None:
                break
        else:
            repo, n = None, 2
        if repo is None or (repo.private and token is None):
            # The Hub does not tell "missing" from "private": 401 without a token, 404 with one.
            raise _Answer(401 if token is None else 404, "Repository not found", "RepoNotFound")
        if files and repo.gated and token is None:
            raise _Answer(401, f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                               "authenticated to access it. Please log in.", "GatedRepo")
        return repo, segments[n:]

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        index = repo.commit_index(revision)
        if index is None:
            raise _Answer(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[index]

    # -- endpoints -------------------------------------------------------------------------------
    def _api(self, segments: list[str], query: dict) -> None:
        repo, rest = self._repo(segments, files=False)
        if not rest:
            return self._json(self._info(repo, self._commit(repo, "main"), query))
        kind, revision, path = rest[0], (rest[1] if len(rest) > 1 else None), "/".join(rest[2:])
        if revision is None:
            raise _Answer(404, "Not Found")
        commit = self._commit(repo, revision)
        if kind == "revision":
            self._json(self._info(repo, commit, query))
        elif kind == "tree":
            self._paged(self._tree(commit, path, query.get("recursive", ["false"])[0].lower() == "true"), query)
        elif kind == "commits":
            history = repo.commits[: repo.commits.index(commit) + 1][::-1]
            self._paged([{"id": c.sha, "title": c.title, "message": "", "date": _iso(c.date),
                          "authors": [{"user": "hubsim"}]} for c in history], query)
        else:
            raise _Answer(404, "Not Found")

    def _paged(self, items: list, query: dict) -> None:
        size = self.sim.page_size
        page = int(query.get("p", ["0"])[0])
        headers = {}
        if (page + 1) * size < len(items):
            url = f"{self.sim.url}{urlsplit(self.path).path}?p={page + 1}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._json(items[page * size:(page + 1) * size], headers)

    def _info(self, repo: Repo, commit: Commit, query: dict) -> dict:
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name in sorted(commit.files):
            sibling: dict = {"rfilename": name}
            if blobs:
                data = commit.files[name]
                sibling.update(size=len(data), blobId=git_blob_sha1(data))
                if name.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        params: dict[str, int] = {}
        for name, data in commit.files.items():
            if name.endswith(".safetensors"):
                for dtype, n in _parameter_counts(data).items():
                    params[dtype] = params.get(dtype, 0) + n
        card = repo.card_data if repo.card_data is not None else _front_matter(commit.files.get("README.md"))
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": commit.sha, "lastModified": _iso(commit.date), "createdAt": _iso(repo.created_at),
            "private": repo.private, "gated": repo.gated, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
            "siblings": siblings, "usedStorage": sum(len(d) for d in commit.files.values()),
        }
        if card:
            info["cardData"] = card
        if params:
            info["safetensors"] = {"parameters": params, "total": sum(params.values())}
        expand = query.get("expand") or query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        return info

    @staticmethod
    def _tree(commit: Commit, path: str, recursive: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if not recursive and "/" in rest:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            data = commit.files[name]
            entry: dict = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "path": f}
                    for f in sorted(folders)]
        if prefix and not entries:
            raise _Answer(404, f"{path} does not exist", "EntryNotFound")
        return entries

    def _resolve(self, method: str, segments: list[str]) -> None:
        at = segments.index("resolve")
        repo, _ = self._repo(segments[:at], files=True)
        if len(segments) < at + 3:
            raise _Answer(404, "Not Found")
        commit = self._commit(repo, segments[at + 1])
        name = "/".join(segments[at + 2:])
        if name not in commit.files:
            raise _Answer(404, f"{name} does not exist at {commit.sha}", "EntryNotFound", commit=commit.sha)
        data = commit.files[name]
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if name.endswith(LFS_SUFFIXES):
            etag = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        else:
            etag = git_blob_sha1(data)
        headers["ETag"] = f'"{etag}"'
        wanted = self.headers.get("Range")
        if method == "GET" and wanted:
            match = _RANGE.match(wanted.strip())
            start = int(match.group(1)) if match and match.group(1) else None
            end = int(match.group(2)) if match and match.group(2) else None
            if match is None or (start is None and end is None):
                raise _Answer(416, f"Bad range {wanted}")
            if start is None:  # "bytes=-N": the last N bytes
                start, end = max(len(data) - end, 0), len(data) - 1
            end = min(len(data) - 1 if end is None else end, len(data) - 1)
            if start >= len(data) or start > end:
                self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], "application/octet-stream", headers)
        self._send(200, data, "application/octet-stream", headers)


def _front_matter(readme: bytes | None) -> dict | None:
    """The YAML front matter of a model card (what the Hub reports as ``cardData``)."""
    if not readme or not readme.startswith(b"---"):
        return None
    import yaml

    head = readme.decode("utf-8", "replace").split("---", 2)
    try:
        data = yaml.safe_load(head[1]) if len(head) == 3 else None
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None

