"""``judge serve``: the judge as a web service (FastAPI, served by uvicorn).

=====================================  ==========================================================
``POST /api/submissions``              a multipart upload (part ``archive``) with
                                       ``Authorization: Bearer TOKEN``: the intake of
                                       ``judge submit`` (:func:`mergelab.judge.intake.submit`);
                                       201 + the receipt (200 when the same files came before),
                                       422 + the receipt and its reasons when rejected
``GET /api/submissions``               the calling team's own submissions (``?limit=&offset=``)
``GET /api/submissions/{id}``          one of them (status, scores, log tail); ``/log`` its log tail
``GET /``                              the public leaderboard (the page ``judge leaderboard --html``
                                       writes)
``GET /team``                          the team's page (token entered in a form, kept in an
                                       HttpOnly cookie); ``POST /team/login``, ``/team/logout``
``GET /healthz``                       the database answers
=====================================  ==========================================================

Another team's submission, log or score answers 404 exactly like one that does not exist. The
API takes the token from the ``Authorization`` header only (never a cookie: no cross-site
request can submit); the cookie serves the team page only. Limits come from
``competition.yaml``: ``upload_max_bytes`` (413, from the ``Content-Length`` before any byte of
the body is read, or as soon as a streamed body passes it), ``submissions_per_day`` per team and
UTC day (429), ``requests_per_minute`` per token (429 with ``Retry-After``).

An upload is streamed into ``store/.uploads/`` (never whole in memory) and handed to the intake
only once complete; the intake stores the files under their content hash with one rename. A
dropped connection or a refused upload removes the partial file; files left by a killed service
are removed when it starts again. Tokens never reach a log, a page or an answer.

One service process per home (the per-token rate and the per-team lock that makes the daily cap
exact live in memory); ``judge round`` runs beside it on the same SQLite database (WAL mode, short
transactions, a busy timeout).
"""
# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, whose types are
# imported inside create_app (fastapi is an optional dependency)
import html
import logging
import math
import re
import shutil
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.judge import leaderboard as lb
from mergelab.judge.db import connect, get_state, loads
from mergelab.judge.home import Competition, Home, JudgeError
from mergelab.judge.intake import submit
from mergelab.judge.teams import Team, TokenChecker, token_key

log = logging.getLogger("mergelab.judge.service")

COOKIE = "mergelab_session"
UPLOADS = ".uploads"
PART = "archive"
_ID = re.compile(r"[0-9a-f]{8,64}")
_FRAMING = 16 << 10          # multipart framing allowed beyond the archive's own bytes
_SMALL_BODY = 4096           # the login form


class Refused(Exception):
    """An answer other than 2xx, with a message for the client (never a token)."""

    def __init__(self, status: int, message: str, *, reasons: list[str] | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.reasons, self.headers, self.extra = status, message, reasons, headers, extra

    def body(self) -> dict:
        out: dict[str, Any] = {"error": self.message}
        if self.reasons is not None:
            out["reasons"] = self.reasons
        return {**out, **(self.extra or {})}


class RateLimiter:
    """A token bucket per key: ``per_minute`` requests in a burst, refilled at ``per_minute``/60 s."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.capacity = max(1, int(per_minute))
        self.rate = self.capacity / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a request may go ahead, else the seconds until one may."""
        now = self._clock()
        with self._lock:
            level, last = self._buckets.get(key, (float(self.capacity), now))
            level = min(float(self.capacity), level + (now - last) * self.rate)
            if level >= 1.0:
                self._buckets[key] = (level - 1.0, now)
                return 0.0
            self._buckets[key] = (level, now)
            return (1.0 - level) / self.rate


def today_utc() -> str:
    """The start of today (UTC) in the database's time format (ISO strings sort as times)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT00:00:00Z")


class Service:
    """What the requests share: the home, the token checker, the limits, one connection per thread."""

    def __init__(self, root: str | Path):
        self.home = Home(Path(root).resolve())
        self.comp: Competition = self.home.load()
        self.tokens = TokenChecker()
        self.rate = RateLimiter(self.comp.requests_per_minute)
        self.uploads = self.home.store / UPLOADS
        self._team_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_lock = threading.Lock()
        self._local = threading.local()
        shutil.rmtree(self.uploads, ignore_errors=True)     # partial uploads of a service killed before
        self.uploads.mkdir(parents=True, exist_ok=True)

    def conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = connect(self.home.database)
        return c

    def team_lock(self, team: str) -> threading.Lock:
        with self._locks_lock:
            return self._team_locks[team]

    # ------------------------------------------------------------------------------ tokens
    def authenticate(self, token: str | None) -> Team:
        """The team of a valid token, after its rate check; else :class:`Refused` (401 / 429)."""
        key = token_key(token or "")
        if key is None:
            raise Refused(401, "a valid team token is needed (Authorization: Bearer TOKEN)",
                          headers={"WWW-Authenticate": "Bearer"})
        wait = self.rate.take(key)
        if wait:
            raise Refused(429, f"too many requests for this token (at most {self.comp.requests_per_minute} per "
                          f"minute); try again in {math.ceil(wait)} s", headers={"Retry-After": str(math.ceil(wait))})
        team = self.tokens.check(self.conn(), token)
        if team is None:
            raise Refused(401, "this token is not valid (wrong, or revoked)", headers={"WWW-Authenticate": "Bearer"})
        return team

    # ------------------------------------------------------------------------------ intake
    def check_quota(self, team: str) -> None:
        """429 when the team is at its daily cap or at its per-round cap."""
        conn = self.conn()
        cap = self.comp.submissions_per_day
        if cap is not None:
            n = conn.execute("SELECT COUNT(*) FROM submissions WHERE team = ? AND received >= ?",
                             (team, today_utc())).fetchone()[0]
            if n >= cap:
                raise Refused(429, f"team {team} has made {n} submission(s) today (at most {cap} per UTC day, "
                              "rejected ones included); submit again after 00:00 UTC",
                              headers={"Retry-After": str(_seconds_to_midnight())})
        per_round = self.comp.submissions_per_round
        if per_round is not None:
            n = conn.execute("SELECT COUNT(*) FROM submissions WHERE team = ? AND round IS NULL AND "
                             "status = 'received'", (team,)).fetchone()[0]
            if n >= per_round:
                raise Refused(429, f"team {team} already has {n} submission(s) waiting for the next round "
                              f"(at most {per_round} per round); submit again after the next round")

    def intake(self, team: str, archive: Path) -> tuple[int, dict]:
        """The intake of ``judge submit`` for a complete upload, under the team's lock (the caps are exact)."""
        with self.team_lock(team):
            self.check_quota(team)
            try:
                receipt = submit(self.home.root, archive, team)
            except MergelabError as exc:
                raise Refused(400, exc.message) from None
        body = asdict(receipt)
        log.info("submission %s from team %s: %s%s", receipt.id[:12], team, receipt.status,
                 " (already received)" if receipt.duplicate else "")
        if receipt.status == "rejected":
            raise Refused(422, "the submission was recorded as rejected", reasons=receipt.reasons, extra=body)
        return (200 if receipt.duplicate else 201), body

    # ------------------------------------------------------------------------------ reading
    def finalized(self) -> bool:
        return get_state(self.conn(), "finalized") is not None

    _COLUMNS = ("SELECT s.id, s.received, s.round, s.status, s.reasons, x.public_score, x.private_score, x.tasks, "
                "x.wall_s, x.detail, x.log_tail FROM submissions s LEFT JOIN results x ON x.submission = s.id ")

    def item(self, row, finalized: bool, with_log: bool) -> dict:
        tasks = loads(row["tasks"], {}) or {}
        out = {"id": row["id"], "received": row["received"], "round": row["round"], "status": row["status"],
               "reasons": loads(row["reasons"], []), "public": row["public_score"],
               "tasks": {t: {"public": v.get("public"), **({"private": v.get("private")} if finalized else {})}
                         for t, v in tasks.items()},
               "wall_s": row["wall_s"], "detail": row["detail"]}
        if finalized:
            out["private"] = row["private_score"]
        if with_log and self.comp.team_log_tail:
            out["log_tail"] = row["log_tail"]
        return out

    def own_submissions(self, team: str, limit: int, offset: int) -> dict:
        conn = self.conn()
        total = conn.execute("SELECT COUNT(*) FROM submissions WHERE team = ?", (team,)).fetchone()[0]
        rows = conn.execute(self._COLUMNS + "WHERE s.team = ? ORDER BY s.seq DESC LIMIT ? OFFSET ?",
                            (team, limit, offset)).fetchall()
        fin = self.finalized()
        return {"team": team, "total": total, "limit": limit, "offset": offset,
                "items": [self.item(r, fin, with_log=False) for r in rows]}

    def own_submission(self, team: str, sid: str) -> dict:
        """One of the team's own submissions by id (or a unique prefix of 8+ hex digits); 404 otherwise."""
        if not _ID.fullmatch(sid):
            raise Refused(404, "no such submission")
        rows = self.conn().execute(self._COLUMNS + "WHERE s.team = ? AND s.id LIKE ? LIMIT 2",
                                   (team, sid + "%")).fetchall()
        if len(rows) != 1:
            raise Refused(404, "no such submission")
        return self.item(rows[0], self.finalized(), with_log=True)

    def leaderboard_page(self) -> str:
        return lb.html_page(lb.build(self.home.root))


def _seconds_to_midnight() -> int:
    now = datetime.now(timezone.utc)
    return max(1, 86400 - (now.hour * 3600 + now.minute * 60 + now.second))


# ---------------------------------------------------------------------------------- the app
def create_app(root: str | Path):
    """The FastAPI application serving the home ``root`` (see the module doc)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    svc = Service(root)
    app = FastAPI(title="mergelab judge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # loc and message only: the offending input is not echoed
        reasons = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"error": "bad request", "reasons": reasons}, status_code=422)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        if request.url.path != "/":
            response.headers["Cache-Control"] = "no-store"
        return response

    def bearer(request: Request) -> str | None:
        value = request.headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    # ---------------------------------------------------------------- API
    @app.post("/api/submissions")
    async def post_submission(request: Request):
        token = bearer(request)
        team = await run_in_threadpool(svc.authenticate, token)
        limit = svc.comp.upload_max_bytes
        too_big = Refused(413, f"the archive is larger than this competition's upload limit ({limit} bytes)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit + _FRAMING):
            raise too_big if (length.isdigit()) else Refused(400, "bad Content-Length")
        boundary = _boundary(request.headers.get("content-type", ""))
        await run_in_threadpool(svc.check_quota, team.name)          # before reading the body
        path = svc.uploads / f"{uuid.uuid4().hex}.part"
        try:
            await _receive(request, boundary, path, limit, too_big)
            status, body = await run_in_threadpool(svc.intake, team.name, path)
            return JSONResponse(body, status_code=status)
        finally:
            path.unlink(missing_ok=True)

    @app.get("/api/submissions")
    def list_submissions(request: Request, limit: int = Query(20, ge=1, le=100),
                         offset: int = Query(0, ge=0, le=10**9)):
        team = svc.authenticate(bearer(request))
        return svc.own_submissions(team.name, limit, offset)

    @app.get("/api/submissions/{sid}")
    def get_submission(request: Request, sid: str):
        team = svc.authenticate(bearer(request))
        return svc.own_submission(team.name, sid)

    @app.get("/api/submissions/{sid}/log")
    def get_log(request: Request, sid: str):
        team = svc.authenticate(bearer(request))
        item = svc.own_submission(team.name, sid)
        if "log_tail" not in item:
            raise Refused(404, "judged runs' logs are not shown to teams in this competition")
        return PlainTextResponse(item["log_tail"] or "")

    @app.get("/healthz")
    def healthz():
        svc.conn().execute("SELECT 1").fetchone()
        return {"ok": True}

    # ---------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse)
    def board():
        return HTMLResponse(svc.leaderboard_page(), headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src data:; frame-ancestors 'none'"})

    page_csp = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                          "frame-ancestors 'none'"}

    @app.get("/team", response_class=HTMLResponse)
    def team_page(request: Request, page: int = Query(1, ge=1, le=10**6)):
        token = request.cookies.get(COOKIE)
        if not token:
            return HTMLResponse(_login_page(), headers=page_csp)
        try:
            team = svc.authenticate(token)
        except Refused as exc:
            r = HTMLResponse(_login_page(exc.message), status_code=exc.status, headers=page_csp)
            if exc.status == 401:
                r.delete_cookie(COOKIE, path="/")
            return r
        per = 50
        data = svc.own_submissions(team.name, per, (page - 1) * per)
        return HTMLResponse(_team_page(data, page, per, svc.finalized()), headers=page_csp)

    @app.post("/team/login")
    async def login(request: Request):
        form = await _small_form(request)
        token = (form.get("token") or "").strip()
        try:
            await run_in_threadpool(svc.authenticate, token)
        except Refused as exc:
            return HTMLResponse(_login_page(exc.message), status_code=exc.status, headers=page_csp)
        r = RedirectResponse("/team", status_code=303)
        r.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/",
                     secure=request.url.scheme == "https", max_age=14 * 86400)
        return r

    @app.post("/team/logout")
    def logout():
        r = RedirectResponse("/team", status_code=303)
        r.delete_cookie(COOKIE, path="/")
        return r

    return app


def _boundary(content_type: str) -> bytes:
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise Refused(415, f"send the archive as multipart/form-data with one part named {PART!r}")
    return params[b"boundary"]


async def _receive(request, boundary: bytes, path: Path, limit: int, too_big: Refused) -> None:
    """Stream the multipart body into ``path`` (the part ``archive`` only), refusing past ``limit``."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.requests import ClientDisconnect

    state: dict[str, Any] = {"field": b"", "value": b"", "headers": {}, "ours": False, "bytes": 0, "found": False,
                             "over": False}
    fh = open(path, "xb")

    def on_part_begin():
        state["headers"], state["ours"] = {}, False

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _, params = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["ours"] = params.get(b"name") == PART.encode() and not state["found"]
        state["found"] = state["found"] or state["ours"]

    def on_part_data(data, start, end):
        if state["ours"] and not state["over"]:
            state["bytes"] += end - start
            if state["bytes"] > limit:
                state["over"] = True
                return
            fh.write(data[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + _FRAMING:
                raise too_big
            parser.write(chunk)
            if state["over"]:
                raise too_big
        parser.finalize()
    except ClientDisconnect:
        log.info("an upload was dropped by the client after %d bytes; nothing kept", received)
        raise Refused(400, "the upload was interrupted") from None
    except MultipartParseError as exc:
        raise Refused(400, f"the multipart body is malformed ({exc})") from None
    finally:
        fh.close()
    if not state["found"]:
        raise Refused(400, f"no part named {PART!r} in the upload")


async def _small_form(request) -> dict[str, str]:
    from urllib.parse import parse_qs

    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > _SMALL_BODY):
        raise Refused(413, "the form is too large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _SMALL_BODY:
            raise Refused(413, "the form is too large")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


# ---------------------------------------------------------------------------------- pages
_STYLE = """<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.note{color:#666}.error{color:#a00}
</style>"""


def _login_page(error: str | None = None) -> str:
    msg = f'<p class="error" id="error">{html.escape(error)}</p>' if error else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Team login</title>{_STYLE}</head>'
            f'<body><h1>Team login</h1>{msg}<form method="post" action="/team/login" id="login">'
            '<label>Team token <input type="password" name="token" id="token" autocomplete="off" required></label> '
            '<button type="submit">Log in</button></form>'
            '<p class="note">The token stays in an HttpOnly cookie of this site. <a href="/">Leaderboard</a></p>'
            "</body></html>")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _team_page(data: dict, page: int, per: int, finalized: bool) -> str:
    e = html.escape
    head = "<tr><th>submission</th><th>received</th><th>round</th><th>status</th><th>public</th>"
    head += ("<th>private</th>" if finalized else "") + "<th>note</th></tr>"
    rows = []
    for it in data["items"]:
        why = (it["reasons"] or ([it["detail"]] if it["detail"] else []))
        rows.append(f'<tr class="sub" data-id="{e(it["id"])}"><td class="id">{e(it["id"][:12])}</td>'
                    f'<td>{e(it["received"])}</td><td>{"-" if it["round"] is None else it["round"]}</td>'
                    f'<td class="status">{e(it["status"])}</td><td class="public">{_fmt(it["public"])}</td>'
                    + (f'<td class="private">{_fmt(it.get("private"))}</td>' if finalized else "")
                    + f'<td>{e(why[0][:200]) if why else ""}</td></tr>')
    pages = max(1, -(-data["total"] // per))
    nav = " ".join(f'<a href="/team?page={p}">{p}</a>' if p != page else f"<b>{p}</b>" for p in range(1, pages + 1)
                   if pages <= 20 or abs(p - page) <= 3 or p in (1, pages))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Team {e(data["team"])}</title>'
            f'{_STYLE}</head><body><h1 id="team">Team {e(data["team"])}</h1>'
            f'<p class="note">{data["total"]} submission(s), newest first. '
            + ("Private scores are shown (the season is final)." if finalized else
               "Private scores are shown after the season ends.")
            + f' <a href="/">Leaderboard</a></p><table id="subs">{head}{"".join(rows)}</table>'
            f'<p class="note">page {nav}</p>'
            '<form method="post" action="/team/logout"><button type="submit" id="logout">Log out</button></form>'
            "</body></html>")


def serve(root: str | Path, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``root`` with uvicorn until interrupted (one process; see the module doc)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise JudgeError("`judge serve` needs FastAPI and uvicorn", hint="pip install 'mergelab[serve]'") from None
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(root)
    uvicorn.run(app, host=host, port=port, log_level=log_level, proxy_headers=True,
                forwarded_allow_ips="127.0.0.1", server_header=False)
