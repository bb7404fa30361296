"""Publishing: upload a merge output (or a run's files) to a Hub repository, as one commit.

:func:`push_files` creates the repository when it is missing (``HfApi.create_repo(exist_ok=True)``,
private on request), the branch when ``revision`` names a new one, and then makes **one commit**
(``HfApi.create_commit``, the machinery of ``upload_folder``) that leaves the branch holding
exactly the given files: new and changed files are uploaded (small ones inline, weights and other
large or binary files through LFS / Xet, as ``huggingface_hub`` decides with the Hub), files no
longer there are deleted (``.gitattributes`` is kept). Pushing the same bytes again makes no commit.

The token comes from where ``huggingface_hub`` looks: ``HF_TOKEN``, then the login cache
(``hf auth login``). The whole push has ``MERGELAB_HUB_TIMEOUT`` plus one second per MB to upload
(:data:`~mergelab.hub.sources.DOWNLOAD_MIN_RATE`), enforced by :mod:`mergelab.hub.deadline`.
Every failure is one :class:`~mergelab.errors.SourceError` subclass: a missing or rejected token
(401) and a token that may not write there (403) are :class:`HubAccessError`, a repository or
revision that is not there (404) :class:`HubNotFoundError`, a Hub that does not answer in time
:class:`HubUnreachableError`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from mergelab.errors import SourceError
from mergelab.hub import deadline as hub_deadline
from mergelab.hub.sources import (DOWNLOAD_MIN_RATE, HubAccessError, HubClient, HubNotFoundError, HubResponseError,
                                  HubUnreachableError)

__all__ = ["PushResult", "folder_files", "push_files", "push_folder"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
#: Names never pushed: hidden files and the temporaries of an interrupted merge or run.
_TEMP_MARKS = (".partial-", ".mergelab-tmp-", ".mergelab-old-")


@dataclass(frozen=True)
class PushResult:
    """What a push did: the commit the branch is at now (``changed``: a new one was made)."""

    repo: str
    revision: str
    commit_url: str
    commit_sha: str
    files: int
    changed: bool

    def record(self) -> dict:
        """The manifest's ``push`` entry."""
        return {"repo": self.repo, "revision": self.revision, "commit_url": self.commit_url}


def folder_files(folder: str | os.PathLike, prefix: str = "") -> dict[str, Path]:
    """``{path in repo: local file}`` of every file under ``folder``, hidden files and temporaries left out."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")) \
                and not any(m in rel for m in _TEMP_MARKS):
            out[prefix + rel] = p
    return out


def push_folder(folder: str | os.PathLike, repo: str, **kwargs) -> PushResult:
    """Push every file of ``folder`` (a merge output) to ``repo``; see :func:`push_files`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"nothing to push: {folder} is not a folder", hint="pass the --out folder of a merge or run")
    return push_files(folder_files(folder), repo, **kwargs)


def push_files(files: Mapping[str, Path], repo: str, *, private: bool = False, revision: str | None = None,
               token: str | None = None, commit_message: str | None = None,
               client: HubClient | None = None) -> PushResult:
    """Make ``revision`` (default ``main``) of Hub repo ``repo`` hold exactly ``files`` ({path in repo: file}).

    ``private`` applies when the repository is created; an existing one keeps its visibility.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    if not _REPO_ID.fullmatch(repo or "") or "--" in repo or ".." in repo:
        raise SourceError(f"--repo {repo!r} is not a Hub repository id",
                          hint="write it as OWNER/NAME, e.g. your-user/my-merge")
    if not files:
        raise SourceError("nothing to push: the folder holds no files")
    client = client or HubClient(token=token)
    api, branch = client.api, revision or "main"
    size = sum(p.stat().st_size for p in files.values())
    with client.operation(client.timeout + size / DOWNLOAD_MIN_RATE, doing="pushing to"), \
            _push_errors(client, repo, branch):
        api.create_repo(repo, private=private, exist_ok=True)
        if revision and not revision.startswith("refs/"):
            api.create_branch(repo, branch=revision, exist_ok=True)
        before = api.model_info(repo, revision=branch).sha
        remote = set(api.list_repo_files(repo, revision=branch))
        ops: list = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                     for name, path in sorted(files.items())]
        ops += [CommitOperationDelete(path_in_repo=name) for name in sorted(remote - set(files))
                if name != ".gitattributes"]
        info = api.create_commit(repo, ops, revision=branch,
                                 commit_message=commit_message or f"mergelab push ({len(files)} files)")
    return PushResult(repo=repo, revision=branch, commit_url=info.commit_url, commit_sha=info.oid,
                      files=len(files), changed=info.oid != before)


def _causes(exc: BaseException):
    """``exc`` and what it was raised from (huggingface_hub wraps LFS upload failures)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class _push_errors:
    """Turn whatever ``huggingface_hub`` raises during a push into one clear SourceError."""

    def __init__(self, client: HubClient, repo: str, branch: str):
        self.client, self.repo, self.branch = client, repo, branch

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, SourceError) or not isinstance(exc, Exception):
            return False
        raise self.translate(exc) from None

    def translate(self, exc: Exception) -> SourceError:
        from huggingface_hub import errors as hf
        from huggingface_hub import get_token

        endpoint, repo, branch = self.client.endpoint, self.repo, self.branch
        timeouts = (TimeoutError, hub_deadline.HubDeadlineExceeded)
        left = hub_deadline.remaining()
        for cause in _causes(exc):
            if isinstance(cause, timeouts) or type(cause).__name__.endswith("TimeoutException") \
                    or (left is not None and left <= 0):
                return HubUnreachableError(
                    f"the Hub at {endpoint} did not finish the push to '{repo}' in time "
                    f"(MERGELAB_HUB_TIMEOUT {self.client.timeout:g} s plus 1 s per MB to upload)",
                    hint="check your network and HF_ENDPOINT, raise MERGELAB_HUB_TIMEOUT for a slow link, or retry: "
                         "a push is one commit, so nothing was half-published")
            if isinstance(cause, hf.RevisionNotFoundError):
                return HubNotFoundError(f"revision '{branch}' does not exist in Hub repository '{repo}'",
                                        hint="push to a branch name (it is created when missing) or to main")
            if isinstance(cause, hf.RepositoryNotFoundError):
                return HubNotFoundError(
                    f"Hub repository '{repo}' was not found at {endpoint} (it exists for another account, or your "
                    "token cannot see it)",
                    hint="check OWNER/NAME, and that your token belongs to an account that may write there")
            if isinstance(cause, hf.HfHubHTTPError):
                status = cause.response.status_code if cause.response is not None else None
                if status == 401:
                    if not (self.client.token or get_token()):
                        return HubAccessError(f"pushing to '{repo}' needs a Hub token with write access, and none "
                                              "was found", hint="set HF_TOKEN, or log in once with `hf auth login`")
                    return HubAccessError(f"the Hub at {endpoint} rejected your token (pushing to '{repo}')",
                                          hint="the token may be expired or mistyped: check HF_TOKEN or log in again "
                                               "(`hf auth login`)")
                if status == 403:
                    return HubAccessError(
                        f"your token may not write to '{repo}'",
                        hint=f"use a token with write access to '{repo.split('/')[0]}' (a fine-grained token needs "
                             "write permission there), or push to your own namespace")
                if status == 404:
                    return HubNotFoundError(f"the Hub at {endpoint} answered 404 while pushing to '{repo}' "
                                            f"(revision '{branch}')",
                                            hint="check OWNER/NAME and --revision")
                return HubResponseError(f"the Hub at {endpoint} answered HTTP {status} while pushing to '{repo}'",
                                        hint="the Hub may be down: retry later, or check HF_ENDPOINT")
            if isinstance(cause, ValueError) and "Invalid metadata in README.md" in str(cause):
                return SourceError(f"the Hub refused the model card README.md of the push to '{repo}': {cause}",
                                   hint="fix the front matter of README.md (base_model must be Hub repo ids)")
            if isinstance(cause, (ConnectionError, OSError)) or type(cause).__name__ in ("ConnectError",
                                                                                         "TransportError"):
                return HubUnreachableError(f"cannot connect to the Hub at {endpoint} to push to '{repo}': {cause}",
                                           hint="check your network and HF_ENDPOINT")
        return HubResponseError(f"the push to '{repo}' failed: {type(exc).__name__}: {exc}",
                                hint="check HF_ENDPOINT points to a Hugging Face Hub")
