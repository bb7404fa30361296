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

and the upload API that ``HfApi.create_repo`` / ``create_branch`` / ``create_commit`` /
``upload_folder`` call (a token is needed; ``writers`` says which namespaces a token may write)::

    POST /api/repos/create                       a new repo with the Hub's first commit (.gitattributes); 409 if it exists
    POST /api/models/{repo}/branch/{branch}      a branch at main (or ``startingPoint``); 409 if it exists
    POST /api/validate-yaml                      the README front matter: a mapping, ``base_model`` repo ids
    POST /api/models/{repo}/preupload/{rev}      per file: ``regular`` or ``lfs`` (binary, an LFS suffix, or
                                                 ≥ 10 MB) and the oid of the file already there
    POST /{repo}.git/info/lfs/objects/batch      LFS batch API (basic transfer): an upload action per new object
    PUT  /lfs-upload/{sha256}                    the object's bytes (checked against its sha256), no token, like S3
    POST /api/models/{repo}/commit/{rev}         ndjson: header, file (base64), lfsFile (an uploaded oid),
                                                 deletedFile / deletedFolder → a new commit on that branch

Uploads go through LFS, not Xet: :meth:`HubSim.environ` sets ``HF_HUB_DISABLE_XET`` (the real Hub
takes both; the Xet protocol talks to a separate storage service this imitation does not have).

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

Repositories keep their commits in a list (oldest first, each holding the complete file set at that
commit); a commit's parent is the one before it unless ``parent`` names another index (a commit on
a branch); branches and tags (``refs``) name a commit by its index.
"""
from __future__ import annotations

import base64
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
    parent: int | None = None  # index of the parent commit (None: the one before)


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

    def history(self, index: int) -> list[Commit]:
        """The commits reachable from commit ``index``, newest first."""
        out = []
        while index is not None and index >= 0:
            out.append(self.commits[index])
            parent = self.commits[index].parent
            index = index - 1 if parent is None else parent
        return out

    def add_commit(self, branch: str, files: dict[str, bytes], title: str) -> Commit:
        """Append a commit holding ``files`` on ``branch`` (dated now) and move the branch to it."""
        parent = self.refs[branch]
        commit = Commit(files, date=datetime.now(timezone.utc), title=title, parent=parent)
        index = len(self.commits)
        digest = hashlib.sha1(f"{self.repo_id}\0{index}\0{commit.date.isoformat()}\0{title}".encode())
        for name in sorted(files):
            digest.update(f"\0{name}\0{git_blob_sha1(files[name])}".encode())
        commit.sha = digest.hexdigest()
        self.commits.append(commit)
        self.refs[branch] = index
        return commit

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

    def __init__(self, repos: Iterable[Repo] = (), *, tokens: Iterable[str] = (), page_size: int = 50,
                 writers: Mapping[str, Iterable[str]] | None = None):
        self.repos: dict[str, Repo] = {}
        for repo in repos:
            self.add(repo)
        self.tokens = set(tokens)
        # token -> namespaces it may create repos in and push to (None: every valid token, everywhere)
        self.writers = None if writers is None else {t: set(ns) for t, ns in writers.items()}
        self.lfs: dict[str, bytes] = {}  # uploaded LFS objects by sha256
        self._lock = threading.Lock()
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

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (to check what a push left there)."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.commit_index(revision)].files)

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

        saved_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE",
                                                     "HF_HUB_DISABLE_XET")}
        names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HUB_DISABLE_XET")
        saved_constants = {k: getattr(constants, k) for k in names}
        os.environ["HF_ENDPOINT"] = self.url
        os.environ["HF_HUB_OFFLINE"] = "0"
        os.environ.pop("HF_TOKEN", None)
        constants.ENDPOINT = self.url
        constants.HUGGINGFACE_CO_URL_TEMPLATE = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HUB_OFFLINE = False
        os.environ["HF_HUB_DISABLE_XET"] = "1"   # uploads through LFS (see the module doc)
        constants.HF_HUB_DISABLE_XET = True
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

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

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
            if method in ("POST", "PUT"):
                self._write(method, segments)
            elif segments[:2] == ["api", "models"] and method == "GET":
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
            history = repo.history(repo.commit_index(revision))
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

    # -- uploads -----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        """The request body (Content-Length or chunked transfer encoding)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _writer(self, namespace: str) -> str:
        """The token of a request that may write into ``namespace`` (401 without a valid one, 403 elsewhere)."""
        sim = self.sim
        auth = self.headers.get("Authorization")
        token = auth.split(" ", 1)[1] if auth and " " in auth else None
        if token is None or token not in sim.tokens:
            raise _Answer(401, "Invalid credentials in Authorization header" if token else
                          "You must be authenticated to write (no token sent)")
        if sim.writers is not None and namespace not in sim.writers.get(token, set()):
            raise _Answer(403, f"You don't have the rights to write to {namespace}: your token may not write there")
        return token

    def _write(self, method: str, segments: list[str]) -> None:
        body = self._body()
        if method == "PUT" and segments[0] == "lfs-upload" and len(segments) == 2:
            if hashlib.sha256(body).hexdigest() != segments[1]:
                raise _Answer(400, "the uploaded bytes do not match their sha256")
            with self.sim._lock:
                self.sim.lfs[segments[1]] = body
            return self._send(200, b"", "text/plain")
        if method != "POST":
            raise _Answer(404, "Not Found")
        if segments == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body))
        if segments == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if len(segments) >= 5 and segments[-4:-1] == ["info", "lfs", "objects"] and segments[-1] == "batch":
            repo_id = "/".join(segments[:-4])
            repo_id = repo_id[:-4] if repo_id.endswith(".git") else repo_id
            return self._lfs_batch(repo_id, json.loads(body))
        if segments[:2] == ["api", "models"] and len(segments) >= 6 and segments[4] in ("preupload", "commit", "branch"):
            repo_id, kind, revision = "/".join(segments[2:4]), segments[4], "/".join(segments[5:])
            repo = self._writable(repo_id)
            with self.sim._lock:
                if kind == "branch":
                    return self._create_branch(repo, revision, json.loads(body or b"{}"))
                self._commit(repo, revision)    # 404 RevisionNotFound for a branch that is not there
                if kind == "preupload":
                    return self._preupload(repo, revision, json.loads(body))
                return self._new_commit(repo, revision, body)
        raise _Answer(404, "Not Found")

    def _writable(self, repo_id: str) -> Repo:
        self._writer(repo_id.split("/")[0])
        repo = self.sim.repos.get(repo_id)
        if repo is None:
            raise _Answer(404, "Repository not found", "RepoNotFound")
        return repo

    def _validate_yaml(self, payload: dict) -> None:
        text = payload.get("content", "")
        errors = []
        card = _front_matter(text.encode()) if text.startswith("---") else {}
        if card is None:
            errors.append({"message": "the YAML front matter is not a mapping"})
        else:
            bases = card.get("base_model") or []
            for base in bases if isinstance(bases, list) else [bases]:
                if not (isinstance(base, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", base)):
                    errors.append({"message": f"base_model: {base!r} is not a model id (namespace/name)"})
        status = 400 if errors else 200
        self._send(status, json.dumps({"errors": errors, "warnings": []}).encode(), "application/json")

    def _create_repo(self, payload: dict) -> None:
        namespace, name = payload.get("organization"), payload.get("name")
        if not namespace or not name:
            raise _Answer(400, "a repo needs a namespace (the imitation has no default user)")
        self._writer(namespace)
        repo_id = f"{namespace}/{name}"
        with self.sim._lock:
            if repo_id in self.sim.repos:   # the Hub's 409 names the repo's URL too
                body = {"error": "You already created this model repo", "url": f"{self.sim.url}/{repo_id}"}
                return self._send(409, json.dumps(body).encode(), "application/json",
                                  {"X-Error-Message": body["error"]})
            private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
            files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                      b"*.bin filter=lfs diff=lfs merge=lfs -text\n"}
            self.sim.add(Repo(repo_id, [Commit(files, date=datetime.now(timezone.utc), title="initial commit")],
                              private=private))
        self._json({"url": f"{self.sim.url}/{repo_id}", "name": repo_id})

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if branch in repo.refs:
            raise _Answer(409, f"Reference refs/heads/{branch} already exists")
        if branch.startswith("refs/"):
            raise _Answer(400, f"Invalid reference for a branch: {branch}")
        start = repo.commit_index(payload.get("startingPoint") or "main")
        if start is None:
            raise _Answer(404, f"Invalid rev id: {payload.get('startingPoint')}", "RevisionNotFound")
        repo.refs[branch] = start
        self._json({})

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        current = self._commit(repo, revision).files
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f.get("size", 0) >= 10 * 1024 * 1024 or b"\0" in sample
            old = current.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old))
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json({"files": files, "commitOid": self._commit(repo, revision).sha})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        self._writable(repo_id)
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.sim.lfs:
                entry["actions"] = {"upload": {"href": f"{self.sim.url}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   "application/vnd.git-lfs+json")

    def _new_commit(self, repo: Repo, branch: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Answer(400, "a commit starts with its header line")
        if branch not in repo.refs or branch in ("refs/pr",):
            raise _Answer(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo.commits[repo.refs[branch]].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.sim.lfs.get(value["oid"])
                if data is None or len(data) != value.get("size"):
                    raise _Answer(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                files[value["path"]] = data
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _Answer(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(prefix)}
            else:
                raise _Answer(400, f"unknown commit operation {key!r}")
        commit = repo.add_commit(branch, files, lines[0]["value"].get("summary") or "Upload files")
        self._json({"success": True, "commitOid": commit.sha, "pullRequestUrl": None,
                    "commitUrl": f"{self.sim.url}/{repo.repo_id}/commit/{commit.sha}"})

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

