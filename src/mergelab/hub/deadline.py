"""One overall deadline for each Hub operation, enforced at the socket.

``huggingface_hub`` sends every request through one shared ``httpx2.Client`` whose timeouts are
*per read*: a server that trickles one byte every few seconds never trips them, and its retry loop
may try again five times. So mergelab gives that client a transport whose network streams know the
deadline of the Hub operation in progress (:func:`deadline`): every connect, read and write waits
at most until that deadline, and once it has passed the next socket call raises
:class:`HubDeadlineExceeded` (a ``TimeoutError``, which ``huggingface_hub`` does not retry).
Outside an operation the transport behaves like httpx's own (the per-read timeouts of the call).

The deadline is process-wide, not per thread, because ``snapshot_download`` fetches files from a
thread pool; operations that overlap share the earliest deadline. Requests sent through a proxy
from the environment (``HTTPS_PROXY``) go through httpx's own proxy transport and keep the per-read
timeouts only.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from typing import Any, Iterable, Iterator

import httpcore2
import httpx2


class HubDeadlineExceeded(TimeoutError):
    """The Hub operation in progress ran past its deadline (raised at the socket)."""


_LOCK = threading.Lock()
_ACTIVE: dict[int, float] = {}  # operation token -> deadline (time.monotonic())
_TOKENS = itertools.count()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Give the Hub traffic inside the block ``seconds`` in all (nested blocks keep the earliest)."""
    token = next(_TOKENS)
    end = time.monotonic() + seconds
    with _LOCK:
        _ACTIVE[token] = end
    try:
        yield end
    finally:
        with _LOCK:
            _ACTIVE.pop(token, None)


def remaining() -> float | None:
    """Seconds left before the earliest active deadline (may be ≤ 0), or None outside an operation."""
    with _LOCK:
        earliest = min(_ACTIVE.values(), default=None)
    return None if earliest is None else earliest - time.monotonic()


def _clamp(timeout: float | None) -> float | None:
    left = remaining()
    if left is None:
        return timeout
    if left <= 0:
        raise HubDeadlineExceeded("the Hub operation ran past its deadline")
    return left if timeout is None else min(timeout, left)


@contextlib.contextmanager
def _timeouts() -> Iterator[None]:
    """A socket timeout that fell on the deadline is the deadline's (not retried), not a read's."""
    try:
        yield
    except httpcore2.TimeoutException as exc:
        left = remaining()
        if left is not None and left <= 0:
            raise HubDeadlineExceeded("the Hub operation ran past its deadline") from exc
        raise


class _Stream(httpcore2.NetworkStream):
    """A network stream whose every read and write ends by the deadline."""

    def __init__(self, stream: httpcore2.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _timeouts():
            return self._stream.read(max_bytes, _clamp(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _timeouts():
            self._stream.write(buffer, _clamp(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        with _timeouts():
            return _Stream(self._stream.start_tls(ssl_context, server_hostname, _clamp(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _Backend(httpcore2.NetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore2.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable | None = None) -> httpcore2.NetworkStream:
        with _timeouts():
            return _Stream(self._backend.connect_tcp(host, port, _clamp(timeout), local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable | None = None) -> httpcore2.NetworkStream:
        with _timeouts():
            return _Stream(self._backend.connect_unix_socket(path, _clamp(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    """httpcore2's exceptions as the httpx2 ones of the same name (what huggingface_hub catches)."""
    try:
        yield
    except httpcore2.ConnectionNotAvailable:
        raise
    except (httpcore2.TimeoutException, httpcore2.NetworkError, httpcore2.ProtocolError, httpcore2.ProxyError,
            httpcore2.UnsupportedProtocol) as exc:
        kind = getattr(httpx2, type(exc).__name__, httpx2.TransportError)
        raise kind(str(exc)) from exc


class _Body(httpx2.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]):
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._stream

    def close(self) -> None:
        if hasattr(self._stream, "close"):
            self._stream.close()


class DeadlineTransport(httpx2.BaseTransport):
    """An httpx2 transport (HTTP/1.1, TLS from the environment) bounded by the active deadline."""

    def __init__(self) -> None:
        self._pool = httpcore2.ConnectionPool(
            ssl_context=httpx2.create_ssl_context(), max_connections=100, max_keepalive_connections=20,
            keepalive_expiry=5.0, network_backend=_Backend())

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        extensions = dict(request.extensions)
        timeouts = dict(extensions.get("timeout") or {})
        left = remaining()
        if left is not None:  # waiting for a free connection counts too
            if left <= 0:
                raise HubDeadlineExceeded("the Hub operation ran past its deadline")
            timeouts["pool"] = left if timeouts.get("pool") is None else min(timeouts["pool"], left)
            extensions["timeout"] = timeouts
        core = httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                              target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=extensions)
        with _as_httpx_errors():
            response = self._pool.handle_request(core)
        return httpx2.Response(status_code=response.status, headers=response.headers, stream=_Body(response.stream),
                               extensions=response.extensions)

    def close(self) -> None:
        self._pool.close()


_INSTALLED = False


def install() -> None:
    """Make huggingface_hub's shared client use :class:`DeadlineTransport` (once per process).

    The client keeps huggingface_hub's own event hooks (offline mode, request ids) and settings
    (redirects followed, no client-wide timeout).
    """
    global _INSTALLED
    if _INSTALLED:
        return
    from huggingface_hub import get_session, set_client_factory

    hooks = {name: list(fns) for name, fns in get_session().event_hooks.items()}
    set_client_factory(lambda: httpx2.Client(transport=DeadlineTransport(), event_hooks=hooks,
                                             follow_redirects=True, timeout=None))
    _INSTALLED = True
