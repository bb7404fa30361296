"""``mergelab judge serve`` as a team and an attacker see it: one real server (uvicorn, 127.0.0.1)
for the module. Tokens (401), other teams' submissions (404), paths and ids with ``..`` or SQL
(4xx, nothing read), oversize uploads (413, no file left), dropped uploads (nothing left), the daily
cap and the request rate (429), no token in any log or page; 40 submissions from 8 concurrent
clients while stub rounds write and read the same database; the ``mergelab submit`` client."""
from __future__ import annotations

import json
import socket
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mergelab.cli import main  # noqa: E402
from mergelab.judge.client import upload  # noqa: E402
from mergelab.judge.home import JudgeError  # noqa: E402
from mergelab.judge.service import RateLimiter  # noqa: E402
from mergelab.judge.teams import add_team, list_teams, revoke_team  # noqa: E402
from mergelab.testing.judge_service import (Server, check_store, make_home, start_round_loop,  # noqa: E402
                                            stub_round, tiny_archive)

LOAD_TEAMS = [f"load{i}" for i in range(8)]
LIMIT = 20_000


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    home = make_home(root / "home", upload_max_bytes=LIMIT, submissions_per_day=6, requests_per_minute=40)
    tokens = {t: add_team(home, t) for t in ["alpha", "beta", "capped", "revoked", "rated", *LOAD_TEAMS]}
    revoke_team(home, "revoked")
    with Server(home, root / "serve.log") as server:
        yield {"home": home, "tokens": tokens, "server": server, "url": server.url, "tmp": root}


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def post(svc, team_or_token: str, archive: Path, **kw) -> httpx2.Response:
    token = svc["tokens"].get(team_or_token, team_or_token)
    files = {"archive": ("s.tar.gz", archive.read_bytes(), "application/gzip")}
    return httpx2.post(svc["url"] + "/api/submissions", files=files, headers=auth(token), timeout=30, **kw)


@pytest.fixture(scope="module")
def submitted(svc):
    """alpha and beta have one submission each, judged by a stub round."""
    ids = {}
    for team in ("alpha", "beta"):
        r = post(svc, team, tiny_archive(svc["tmp"] / f"{team}.tar.gz", team))
        assert r.status_code == 201, r.text
        ids[team] = r.json()["id"]
    stub_round(svc["home"])
    return ids


def test_tokens_are_stored_only_as_salted_hashes(svc):
    db = (svc["home"] / "secret" / "judge.sqlite").read_bytes()
    for token in svc["tokens"].values():
        assert token.encode() not in db and token.split("_", 2)[2].encode() not in db
    with pytest.raises(JudgeError, match="already has an active token"):
        add_team(svc["home"], "alpha")
    with pytest.raises(JudgeError, match="not allowed"):
        add_team(svc["home"], "x'; DROP TABLE tokens; --")
    listed = {t["team"]: t for t in list_teams(svc["home"])}
    assert listed["revoked"]["revoked"] and not listed["alpha"]["revoked"]


def test_no_wrong_or_revoked_token_is_401(svc, submitted):
    good = svc["tokens"]["alpha"]
    key = good.split("_")[1]
    wrong_secret = f"mlj_{key}_{'A' * 43}"
    archive = tiny_archive(svc["tmp"] / "x.tar.gz", "x")
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}, auth("nonsense"), auth(wrong_secret),
                    auth(svc["tokens"]["revoked"])):
        for method, path in (("GET", "/api/submissions"), ("GET", f"/api/submissions/{submitted['alpha']}"),
                             ("POST", "/api/submissions")):
            kw = {"files": {"archive": ("a.tar.gz", archive.read_bytes())}} if method == "POST" else {}
            r = httpx2.request(method, svc["url"] + path, headers=headers, timeout=30, **kw)
            assert r.status_code == 401, (headers, path, r.text)
            assert "error" in r.json() and r.headers["www-authenticate"] == "Bearer"
    # a revoked token stops at once, even one verified before (the cache does not outlive a revocation)
    tok = add_team(svc["home"], "late")
    assert httpx2.get(svc["url"] + "/api/submissions", headers=auth(tok), timeout=30).status_code == 200
    revoke_team(svc["home"], "late")
    assert httpx2.get(svc["url"] + "/api/submissions", headers=auth(tok), timeout=30).status_code == 401
    # the team page with a bad cookie shows the login form, not data
    r = httpx2.get(svc["url"] + "/team", cookies={"mergelab_session": wrong_secret}, timeout=30)
    assert r.status_code == 401 and 'id="login"' in r.text


def test_a_team_sees_only_its_own_submissions_and_others_are_404(svc, submitted):
    a, b = svc["tokens"]["alpha"], svc["tokens"]["beta"]
    mine = httpx2.get(svc["url"] + "/api/submissions", headers=auth(a), timeout=30).json()
    assert [i["id"] for i in mine["items"]] == [submitted["alpha"]] and mine["total"] == 1
    item = mine["items"][0]
    assert item["status"] == "scored" and item["public"] is not None and "private" not in item
    assert all("private" not in v for v in item["tasks"].values())
    own = httpx2.get(svc["url"] + f"/api/submissions/{submitted['alpha']}", headers=auth(a), timeout=30).json()
    assert own["log_tail"].startswith("stub run of") and "private" not in own
    log = httpx2.get(svc["url"] + f"/api/submissions/{submitted['alpha'][:12]}/log", headers=auth(a), timeout=30)
    assert log.status_code == 200 and log.text.startswith("stub run of")
    missing = "0" * 64
    answers = []
    for sid in (submitted["beta"], submitted["beta"][:12], missing):
        for suffix in ("", "/log"):
            r = httpx2.get(svc["url"] + f"/api/submissions/{sid}{suffix}", headers=auth(a), timeout=30)
            answers.append((r.status_code, r.text))
    assert {x for x in answers} == {(404, '{"error":"no such submission"}')}
    # pagination
    page = httpx2.get(svc["url"] + "/api/submissions?limit=1&offset=1", headers=auth(a), timeout=30).json()
    assert page["items"] == [] and page["total"] == 1 and page["limit"] == 1


BAD_PATHS = [
    "/api/submissions/..%2F..%2Fsecret%2Fjudge.sqlite",
    "/api/submissions/../../secret/judge.sqlite",
    "/api/submissions/%2e%2e/%2e%2e/competition.yaml",
    "/api/submissions/'%20OR%20'1'='1",
    "/api/submissions/1%20OR%201=1;--",
    "/api/submissions/%25",                       # LIKE wildcards
    "/api/submissions/________",
    "/api/submissions/%22%3B%20DROP%20TABLE%20submissions%3B%20--",
    "/api/submissions?limit=1;DROP%20TABLE%20submissions",
    "/api/submissions?offset=-1",
    "/api/submissions?limit=1000000",
    "/../secret/judge.sqlite",
    "/%2e%2e/secret/judge.sqlite",
    "/secret/judge.sqlite",
    "/store/",
    "/competition.yaml",
    "/team?page=1%20OR%201=1",
]


def raw_get(url: str, path: str, headers: dict) -> tuple[int, bytes]:
    """A GET with the path sent byte for byte (no client-side normalisation of ``..``)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_paths_and_ids_with_dotdot_or_sql_are_4xx_and_read_nothing(svc, submitted):
    a = svc["tokens"]["alpha"]
    targets = (svc["home"] / "competition.yaml").read_bytes()[:40]
    for path in BAD_PATHS:
        status, body = raw_get(svc["url"], path, auth(a))
        assert 400 <= status < 500, (path, status, body[:200])
        assert b"SQLite format" not in body and submitted["beta"].encode() not in body and targets not in body, path
    conn = sqlite3.connect(svc["home"] / "secret" / "judge.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM submissions").fetchone()[0] >= 2      # the table is still there
    conn.close()
    # an archive that climbs out with '..' is refused by the intake (422) and writes nothing outside
    import io
    import tarfile
    evil = svc["tmp"] / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        for name in ("recipe.yaml", "../../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"x: "))
    r = post(svc, "alpha", evil)
    assert r.status_code == 422 and "climbs out" in r.json()["reasons"][0]
    assert not list(svc["tmp"].rglob("escaped.txt"))


def test_oversize_upload_is_413_and_leaves_no_file(svc):
    home = svc["home"]
    before = check_store(home)
    big = tiny_archive(svc["tmp"] / "big.tar.gz", "big", padding=3 * LIMIT)
    r = post(svc, "alpha", big)                                   # Content-Length says it: refused up front
    assert r.status_code == 413 and "upload limit" in r.json()["error"]

    def chunks():                                                 # no length: refused once the stream passes it
        data = big.read_bytes()
        yield b'--b0undary\r\nContent-Disposition: form-data; name="archive"; filename="a"\r\n\r\n'
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]
        yield b"\r\n--b0undary--\r\n"

    r = httpx2.post(svc["url"] + "/api/submissions", content=chunks(), timeout=30,
                    headers={**auth(svc["tokens"]["alpha"]), "Content-Type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 413
    after = check_store(home)
    assert after["leftovers"] == [] and after["folders"] == before["folders"] and after["rows"] == before["rows"]


def test_a_dropped_upload_leaves_nothing(svc):
    home = svc["home"]
    before = check_store(home)
    host, port = svc["url"].split("//")[1].split(":")
    body_start = b'--bnd\r\nContent-Disposition: form-data; name="archive"; filename="a"\r\n\r\n' + b"\x1f\x8b" * 3000
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall((f"POST /api/submissions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                   f"{svc['tokens']['beta']}\r\nContent-Type: multipart/form-data; boundary=bnd\r\n"
                   f"Content-Length: {LIMIT}\r\n\r\n").encode() + body_start)
        deadline = time.monotonic() + 10
        while not list((home / "store" / ".uploads").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)                                       # the partial file exists while it streams
        assert list((home / "store" / ".uploads").iterdir())
    deadline = time.monotonic() + 10
    while check_store(home)["leftovers"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = check_store(home)
    assert after["leftovers"] == [] and after["folders"] == before["folders"] and after["rows"] == before["rows"]


def test_daily_cap_is_429(svc):
    codes = [post(svc, "capped", tiny_archive(svc["tmp"] / f"c{i}.tar.gz", f"capped-{i}")).status_code
             for i in range(7)]
    assert codes == [201] * 6 + [429]
    r = post(svc, "capped", tiny_archive(svc["tmp"] / "c7.tar.gz", "capped-7"))
    assert r.status_code == 429 and "at most 6 per UTC day" in r.json()["error"] and int(r.headers["retry-after"]) > 0


def test_rate_limiter_is_a_token_bucket_per_key():
    now = [0.0]
    lim = RateLimiter(40, clock=lambda: now[0])
    assert [lim.take("a") for _ in range(40)] == [0.0] * 40      # a burst of 40
    assert lim.take("a") == pytest.approx(1.5)                     # then one per 60/40 s
    assert lim.take("b") == 0.0                                    # another key has its own bucket
    now[0] += 1.5
    assert lim.take("a") == 0.0 and lim.take("a") == pytest.approx(1.5)
    now[0] += 600                                                  # refills to the burst, not beyond
    assert [lim.take("a") for _ in range(41)].count(0.0) == 40


def test_request_rate_per_token_is_429(svc):
    # over HTTP the bucket refills while the requests run (40/min: one more per 1.5 s), so a slow
    # machine may let a few more through; the exact arithmetic is the test above
    tok = svc["tokens"]["rated"]
    t0, codes = time.monotonic(), []
    while 429 not in codes and len(codes) < 400:
        r = httpx2.get(svc["url"] + "/api/submissions", headers=auth(tok), timeout=30)
        codes.append(r.status_code)
    elapsed = time.monotonic() - t0
    assert codes[-1] == 429 and set(codes[:-1]) == {200}
    assert 40 <= len(codes) - 1 <= 40 + elapsed / 1.5 + 1
    assert "per minute" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
    # another team is not slowed down
    assert httpx2.get(svc["url"] + "/api/submissions", headers=auth(svc["tokens"]["beta"]),
                      timeout=30).status_code == 200


def test_concurrent_submissions_while_rounds_run(svc, capsys):
    """40 submissions from 8 clients while stub rounds (another process) write and read the database:
    each accepted once, none lost, none half-written."""
    home, tmp = svc["home"], svc["tmp"]
    archives = [(team, tiny_archive(tmp / f"{team}-{i}.tar.gz", f"{team}-{i}")) for team in LOAD_TEAMS
                for i in range(5)]
    before = check_store(home)
    stop = tmp / "stop-rounds"
    loop = start_round_loop(home, stop)
    latencies, answers = [], []
    lock = threading.Lock()

    def client(team: str) -> None:
        with httpx2.Client(timeout=60) as http:
            for t, path in archives:
                if t != team:
                    continue
                t0 = time.perf_counter()
                a = upload(svc["url"], svc["tokens"][team], path, client=http)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    answers.append(a)

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, LOAD_TEAMS))
    finally:
        stop.touch()
        out, err = loop.communicate(timeout=120)
    assert loop.returncode == 0, err[-2000:]
    rounds = json.loads(out)
    assert rounds["rounds"] >= 1 and rounds["judged"] >= 1          # the rounds really ran beside the intake
    assert [a.status for a in answers] == [201] * 40, [a.body for a in answers if a.status != 201][:3]
    ids = {a.body["id"] for a in answers}
    after = check_store(home)
    assert len(ids) == 40 and after["rows"] == before["rows"] + 40 and after["ids"] == after["rows"]
    assert {a.body["content"] for a in answers} <= after["folders"] and after["half_written"] == []
    assert after["leftovers"] == []
    q = statistics.quantiles(latencies, n=100)
    with capsys.disabled():
        print(f"\n  intake over HTTP, 40 submissions / 8 clients: p50 {q[49] * 1000:.0f} ms, "
              f"p99 {q[98] * 1000:.0f} ms; rounds beside it: {out.strip()}")


def test_mergelab_submit_prints_the_receipt(svc, capsys, tmp_path):
    folder = tmp_path / "sub"
    (folder / "base").mkdir(parents=True)
    (folder / "e1").mkdir()
    (folder / "recipe.yaml").write_text("base: {path: base}\nexperts:\n  - {path: e1}\nmethod: {name: linear}\n")
    (folder / "base" / "config.json").write_text("{}")
    (folder / "e1" / "config.json").write_text("{}")
    token = svc["tokens"]["beta"]
    assert main(["submit", str(folder), "--to", svc["url"], "--token", token, "--no-progress"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("submission ") and "team:     beta" in out.out and "status:   received" in out.out
    (folder / "recipe.yaml").write_text("base: {model: someone/model, revision: main}\n")
    assert main(["submit", str(folder), "--to", svc["url"], "--token", token, "--no-progress"]) == 1
    assert "status:   rejected" in capsys.readouterr().out
    assert main(["submit", str(folder), "--to", svc["url"], "--token", "mlj_bad", "--no-progress"]) == 2
    assert "401" in capsys.readouterr().err


def test_tokens_never_appear_in_logs_or_pages(svc, submitted):
    """Last: after every request above, the server's log and every page are free of tokens."""
    a = svc["tokens"]["alpha"]
    pages = [httpx2.get(svc["url"] + p, timeout=30).text for p in ("/", "/team", "/healthz")]
    with httpx2.Client(base_url=svc["url"], timeout=30) as browser:
        r = browser.post("/team/login", data={"token": a}, follow_redirects=True)
        assert r.status_code == 200 and "Team alpha" in r.text
        pages += [r.text, browser.get("/team").text]
        pages += [browser.get(f"/api/submissions/{submitted['alpha']}", headers=auth(a)).text]
        cookie = next(c for c in r.history[0].headers.get_list("set-cookie") if c.startswith("mergelab_session="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    log = svc["server"].log()
    assert "POST /api/submissions" in log and "submission " in log
    for token in svc["tokens"].values():
        secret = token.split("_", 2)[2]
        assert secret not in log and all(secret not in p for p in pages)
