"""A season of eight tiny submissions judged end to end: on this machine (with the judge
SIGKILLed mid-round and started again) and as Ray tasks; the leaderboard as text and as an HTML
page opened in headless Chromium; the similarity evidence; ``judge verify``."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergelab.cli import main
from mergelab.testing.hubsim import HubSim
from mergelab.judge import leaderboard as lb
from mergelab.judge.db import connect
from mergelab.testing.judge_season import build_season
from mergelab.judge.home import Home, init_home, is_public
from mergelab.judge.intake import submit
from mergelab.judge.rounds import run_round
from mergelab.judge.sandbox import namespaces_available

pytestmark = pytest.mark.timeout(900)
BUDGET_S = 35   # the good runs take 7-12 s alone, 16-17 s on a loaded 2-core machine
EXPECTED = {"alpha": "scored", "beta": "scored", "gamma": "scored", "delta": "over_time", "epsilon": "failed",
            "zeta": "rejected", "eta": "rejected", "theta": "failed"}


def make_home(season, home: Path) -> dict:
    init_home(home, season.tasks, budget=f"{BUDGET_S}s", speed_factor=1.0, memory_limit_gb=8)
    with HubSim(season.repos) as hub, hub.environ(cache_dir=home.parent / f"{home.name}-user-cache"):
        return {team: submit(home, path, team) for team, path in season.for_home(home)}


def results(home: Path) -> dict[str, dict]:
    conn = connect(Home(home).database)
    try:
        rows = conn.execute("SELECT s.team, s.id, s.status, s.reasons, x.* FROM submissions s LEFT JOIN results x "
                            "ON x.submission = s.id").fetchall()
        return {r["team"]: dict(r) for r in rows}
    finally:
        conn.close()


def board_key(home: Path) -> list[tuple]:
    board = lb.build(home, private=True)
    return [(r["team"], r["rank"], r["public"], r["private"], json.dumps(r["tasks"], sort_keys=True))
            for r in board.rows]


@pytest.fixture(scope="module")
def season(tmp_path_factory):
    root = tmp_path_factory.mktemp("season")
    return build_season(root, home=root / "home")


@pytest.fixture(scope="module")
def local(season):
    """The round on this machine: the judge is SIGKILLed once the first result is recorded,
    then `judge round` is run again and finishes the round."""
    home = season.root / "home"
    receipts = make_home(season, home)
    log = open(season.root / "killed-judge.log", "wb")
    judge = subprocess.Popen([sys.executable, "-m", "mergelab", "judge", "round", str(home), "--device", "cpu"],
                             stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    conn = connect(Home(home).database)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        judging = conn.execute("SELECT COUNT(*) FROM submissions WHERE status = 'judging'").fetchone()[0]
        if done >= 1 and judging >= 1:
            time.sleep(1.0)                      # the next judged run is under way
            break
        time.sleep(0.2)
    judge.send_signal(signal.SIGKILL)
    judge.wait()
    log.close()
    before = {r["submission"]: dict(r) for r in conn.execute("SELECT * FROM results")}
    open_rounds = conn.execute("SELECT round FROM rounds WHERE finished IS NULL").fetchall()
    conn.close()
    time.sleep(0.5)
    orphans = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, str(home / "scratch"))]
    t0 = time.monotonic()
    report = run_round(home, device="cpu")
    return {"home": home, "receipts": receipts, "before": before, "open_rounds": len(open_rounds),
            "orphans": orphans, "report": report, "resume_s": time.monotonic() - t0}


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def test_round_records_every_kind_of_outcome(local, season):
    home, res = local["home"], results(local["home"])
    assert {t: r["status"] for t, r in res.items()} == EXPECTED
    # rejected at intake, with the reason, and never judged
    assert "after the cut-off" in json.loads(res["zeta"]["reasons"])[0]
    assert "'..'" in json.loads(res["eta"]["reasons"])[0]
    assert not list(season.root.rglob("escaped.txt")) and not (home / "store" / "passwd").exists()
    assert res["zeta"]["submission"] is None and res["eta"]["submission"] is None
    # over time: killed at its limit, and the round went on
    assert BUDGET_S <= res["delta"]["wall_s"] < BUDGET_S + 5 and "killed at the limit" in res["delta"]["detail"]
    assert res["delta"]["limit_s"] == BUDGET_S
    # a crash is a recorded result with the log tail
    assert "exit status 2" in res["epsilon"]["detail"] and "another model than the base" in res["epsilon"]["log_tail"]
    # scored runs: wall time, peak memory, manifest; predictions for every hidden row
    conn = connect(Home(home).database)
    for team in ("alpha", "beta", "gamma"):
        r = res[team]
        assert 0 < r["wall_s"] < BUDGET_S and 100 < r["peak_mem_mb"] < 8192
        manifest = json.loads(r["manifest"])
        assert manifest["recipe"]["base"]["revision"] == season.sha["org/base"]
        assert conn.execute("SELECT COUNT(*) FROM predictions WHERE submission = ?", (r["id"],)).fetchone()[0] == 22
        # the public score of each task, by hand from the recorded per-row correctness
        tasks = json.loads(r["tasks"])
        for task in ("mc", "gen"):
            rows = conn.execute("SELECT row_id, correct FROM predictions WHERE submission = ? AND task = ?",
                                (r["id"], task)).fetchall()
            if task == "mc":
                pub = [x["correct"] for x in rows if is_public("mc", x["row_id"], 0.3)]
                assert tasks["mc"]["public"] == pytest.approx(sum(pub) / len(pub))
                assert tasks["mc"]["public_rows"] + tasks["mc"]["private_rows"] == 16
        assert r["public_score"] == pytest.approx((tasks["mc"]["public"] + tasks["gen"]["public"]) / 2)
    conn.close()
    # the judged runs never saw a target
    assert "target" not in (home / "inputs" / "mc.csv").read_text().splitlines()[0]


@pytest.mark.skipif(not namespaces_available(), reason="unshare -rnm is not available here")
def test_a_run_that_reads_hidden_targets_fails_and_is_recorded(local):
    r = results(local["home"])["theta"]
    assert r["status"] == "failed" and "No such file or directory" in r["log_tail"]
    assert "secret/targets/mc.csv" in r["log_tail"]
    assert "network namespace" in json.loads(r["isolation"])["network"]


def test_a_judge_killed_mid_round_finishes_it_with_nothing_lost_or_scored_twice(local):
    assert local["before"] and local["open_rounds"] == 1
    assert local["orphans"] == []                         # its judged run died with it
    report = local["report"]
    assert report.resumed and report.round == 1
    res = results(local["home"])
    judged = [t for t, s in EXPECTED.items() if s != "rejected"]
    assert sorted(x["team"] for x in report.judged) == sorted(
        t for t in judged if res[t]["submission"] not in local["before"])
    for sid, row in local["before"].items():             # what was recorded before the kill is untouched
        again = next(r for r in res.values() if r["submission"] == sid)
        assert again["finished"] == row["finished"] and again["public_score"] == row["public_score"]
    conn = connect(Home(local["home"]).database)
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == len(judged)
    assert conn.execute("SELECT round, finished IS NOT NULL AS f FROM rounds").fetchall()[0]["f"] == 1
    conn.close()
    assert run_round(local["home"]).round is None          # nothing left to judge


def test_leaderboard_text_public_then_private_after_finalize(local, capsys, tmp_path):
    home = str(local["home"])
    assert main(["judge", "leaderboard", home]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "leaderboard (public part)" and "private" not in lines[1]
    ranked = [ln.split()[1] for ln in lines[2:5]]
    res = results(local["home"])
    assert ranked == sorted(["alpha", "beta", "gamma"], key=lambda t: (-res[t]["public_score"], t))
    assert "delta  round 1" in out and "over_time" in out and "eta  round 1" in out
    assert main(["judge", "leaderboard", home, "--private"]) == 0
    assert "private" in capsys.readouterr().out.splitlines()[1]
    html_before = tmp_path / "before.html"
    assert main(["judge", "leaderboard", home, "--html", str(html_before)]) == 0
    capsys.readouterr()
    assert '"private_shown": false' in html_before.read_text()
    assert "http" not in re.sub(r'http://www\.w3\.org/2000/svg', "", html_before.read_text())   # no CDN


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def dump_dom(page: Path, fragment: str = "") -> str:
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (`make test` installs it where it can)")
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                        "--dump-dom", page.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def shown_rows(dom: str) -> list[list[str]]:
    body = dom.split('<tbody id="rows">', 1)[1].split("</tbody>", 1)[0]
    return [re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in re.findall(r'<tr class="row">(.*?)</tr>', body)]


def test_html_leaderboard_in_headless_chromium(local, tmp_path):
    home = local["home"]
    page = tmp_path / "board.html"
    assert main(["judge", "leaderboard", str(home), "--private", "--html", str(page)]) == 0
    res = results(home)
    dom = dump_dom(page)
    assert 'data-rendered="yes"' in dom
    rows = shown_rows(dom)
    by_rank = sorted(["alpha", "beta", "gamma"], key=lambda t: (-res[t]["public_score"], t))
    assert [r[1] for r in rows] == by_rank
    alpha = next(r for r in rows if r[1] == "alpha")
    assert alpha[4] == f"{res['alpha']['public_score']:.4f}" and alpha[5] == f"{res['alpha']['private_score']:.4f}"
    tasks = json.loads(res["alpha"]["tasks"])
    assert alpha[6:] == [f"{tasks['mc']['public']:.4f}", f"{tasks['gen']['public']:.4f}"]
    # one SVG chart per task, one bar per team and part
    assert dom.count('class="taskchart"') == 2
    assert len(re.findall(r'<rect [^>]*data-team="alpha"', dom)) == 4
    # sorted by the private score, ascending, from the page's address
    rows = shown_rows(dump_dom(page, "#sort=private&dir=asc"))
    assert [r[1] for r in rows] == sorted(["alpha", "beta", "gamma"], key=lambda t: (res[t]["private_score"],
                                                                                      by_rank.index(t)))
    assert "▲" in dump_dom(page, "#sort=team")


def test_similar_flags_the_near_copy_and_not_the_honest_pair(local, capsys):
    assert main(["judge", "similar", str(local["home"]), "--json"]) == 0
    pairs = json.loads(capsys.readouterr().out)
    flagged = {frozenset((p["team_a"], p["team_b"])): p for p in pairs if p["flags"]}
    assert list(flagged) == [frozenset({"alpha", "beta"})]
    copy = flagged[frozenset({"alpha", "beta"})]
    assert copy["same_recipe"] and copy["cosine"] > 0.95 and copy["agreement"] - copy["expected"] > 0.15
    honest = next(p for p in pairs if {p["team_a"], p["team_b"]} == {"alpha", "gamma"})
    assert not honest["same_recipe"] and abs(honest["cosine"]) < 0.3 and honest["rows"] == 22
    assert main(["judge", "similar", str(local["home"]), "--round", "1"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[1].startswith("FLAG  alpha / beta") and "nothing is disqualified" in text


def test_verify_reruns_and_reports_differing_outputs(local, capsys):
    """One rerun: the recorded hash of eval/mc.csv is altered first, so the rerun must name that
    file, and only that one (every other output reproduces byte for byte)."""
    home = local["home"]
    alpha = results(home)["alpha"]["id"]
    conn = connect(Home(home).database)
    manifest = json.loads(conn.execute("SELECT manifest FROM results WHERE submission = ?", (alpha,)).fetchone()[0])
    assert "eval/mc.csv" in manifest["outputs"] and len(manifest["outputs"]) > 5
    manifest["outputs"]["eval/mc.csv"] = "0" * 64          # as if the judged run had written other bytes
    conn.execute("UPDATE results SET manifest = ? WHERE submission = ?", (json.dumps(manifest), alpha))
    conn.close()
    assert main(["judge", "verify", str(home), alpha[:12], "--device", "cpu"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{alpha[:12]}: differs", "  differs: eval/mc.csv"]


@pytest.fixture(scope="session")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_backend_gives_the_same_results_and_leaderboard(local, season, ray_local):
    home = season.root / "ray-home"
    make_home(season, home)
    t0 = time.monotonic()
    report = run_round(home, backend="ray", device="cpu")
    wall = time.monotonic() - t0
    res, ref = results(home), results(local["home"])
    assert {t: r["status"] for t, r in res.items()} == EXPECTED
    for team in ("alpha", "beta", "gamma"):
        assert res[team]["tasks"] == ref[team]["tasks"]
        assert res[team]["public_score"] == ref[team]["public_score"]
    assert BUDGET_S <= res["delta"]["wall_s"] < BUDGET_S + 5
    # the uninterrupted Ray round and the interrupted local round give the same leaderboard
    assert board_key(home) == board_key(local["home"])
    assert len(report.judged) == 6 and wall < 240
    # after finalize the private scores stand beside the public ones, and rank the teams
    assert main(["judge", "finalize", str(home)]) == 0
    board = lb.build(home)
    assert board.finalized and board.show_private
    assert [r["team"] for r in board.rows] == sorted(["alpha", "beta", "gamma"],
                                                     key=lambda t: (-res[t]["private_score"], t))
    text = lb.text(board)
    assert text.startswith("leaderboard (final: private scores)") and "private" in text.splitlines()[1]
