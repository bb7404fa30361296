"""The teams' side of the service (``mergelab submit SUBMISSION --to URL --token T``).

A folder is packed into a ``.tar.gz`` first (in a temporary folder); the archive is sent as one
``multipart/form-data`` part named ``archive``, streamed from the file with its length known
up front (the server refuses an oversize upload from the header, before any byte of the body).
"""
from __future__ import annotations

import secrets
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx2

from mergelab.judge.home import JudgeError
from mergelab.judge.intake import Receipt

_CHUNK = 1 << 16


@dataclass
class Answer:
    status: int                  # the HTTP status
    body: dict                   # the JSON answer: a receipt, or {"error": ..., "reasons": [...]}

    @property
    def accepted(self) -> bool:
        return self.status in (200, 201)


def pack(folder: Path, out: Path) -> Path:
    """``folder`` as a ``.tar.gz`` at ``out`` (its files at the top of the archive)."""
    with tarfile.open(out, "w:gz") as tf:
        for p in sorted(folder.rglob("*")):
            tf.add(p, arcname=p.relative_to(folder).as_posix(), recursive=False)
    return out


def _body(archive: Path, boundary: str, progress: Callable[[int], None] | None) -> tuple[int, Iterator[bytes]]:
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="archive"; filename="submission.tar.gz"\r\n'
            "Content-Type: application/gzip\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = archive.stat().st_size

    def chunks() -> Iterator[bytes]:
        yield head
        with open(archive, "rb") as fh:
            while block := fh.read(_CHUNK):
                yield block
                if progress:
                    progress(len(block))
        yield tail

    return len(head) + size + len(tail), chunks()


def upload(url: str, token: str, submission: str | Path, *, progress: Callable[[int, int], None] | None = None,
           timeout: float = 600.0, client: httpx2.Client | None = None) -> Answer:
    """POST a submission (folder or archive) to ``URL/api/submissions``; ``progress(done, total)``
    is called as bytes of the archive are sent."""
    submission = Path(submission)
    with tempfile.TemporaryDirectory(prefix="mergelab-submit-") as tmp:
        if submission.is_dir():
            archive = pack(submission, Path(tmp) / "submission.tar.gz")
        elif submission.is_file():
            archive = submission
        else:
            raise JudgeError(f"{submission} does not exist")
        total, sent = archive.stat().st_size, [0]

        def step(n: int) -> None:
            sent[0] += n
            if progress:
                progress(sent[0], total)

        boundary = secrets.token_hex(16)
        length, body = _body(archive, boundary, step)
        headers = {"Authorization": f"Bearer {token}", "Content-Length": str(length),
                   "Content-Type": f"multipart/form-data; boundary={boundary}"}
        endpoint = url.rstrip("/") + "/api/submissions"
        own = client is None
        http = client or httpx2.Client(timeout=timeout)
        try:
            r = http.post(endpoint, content=body, headers=headers)
        except httpx2.HTTPError as exc:
            raise JudgeError(f"cannot reach the judge at {url}: {type(exc).__name__}: {exc}") from None
        finally:
            if own:
                http.close()
    try:
        data = r.json()
    except ValueError:
        data = {"error": r.text[:500]}
    return Answer(r.status_code, data if isinstance(data, dict) else {"error": str(data)})


def receipt_text(body: dict) -> str:
    """A receipt (the service's JSON) as ``judge submit`` prints it."""
    return Receipt(**{k: body[k] for k in ("id", "team", "received", "status", "content")},
                   reasons=list(body.get("reasons") or []), duplicate=bool(body.get("duplicate"))).text()
