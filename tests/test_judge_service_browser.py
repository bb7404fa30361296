"""The service in a real browser: headless Chromium (the system's, driven by Playwright) logs in on
the team page with a token, sees its own submission with its status and public score (and not the
other team's), and the public leaderboard at ``/`` shows public scores only."""
from __future__ import annotations

import re
import shutil
import sqlite3

import httpx2
import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api")

from mergelab.judge.teams import add_team  # noqa: E402
from mergelab.testing.judge_service import Server, make_home, stub_round, tiny_archive  # noqa: E402


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_team_page_and_public_leaderboard_in_headless_chromium(tmp_path):
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (`make test` installs it where it can)")
    home = make_home(tmp_path / "home")
    tokens = {t: add_team(home, t) for t in ("alpha", "beta")}
    with Server(home, tmp_path / "serve.log") as server:
        ids = {}
        for team, tok in tokens.items():
            files = {"archive": ("s.tar.gz", tiny_archive(tmp_path / f"{team}.tar.gz", team).read_bytes())}
            r = httpx2.post(server.url + "/api/submissions", files=files, headers={"Authorization": f"Bearer {tok}"},
                            timeout=30)
            assert r.status_code == 201, r.text
            ids[team] = r.json()["id"]
        stub_round(home)
        conn = sqlite3.connect(home / "secret" / "judge.sqlite")
        scores = {s: (p, q) for s, p, q in conn.execute("SELECT submission, public_score, private_score FROM results")}
        conn.close()
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.set_default_timeout(20_000)
                page.goto(server.url + "/team")
                page.fill("#token", "mlj_000000000000_" + "x" * 43)
                page.click("button[type=submit]")
                assert "not valid" in page.inner_text("#error")
                page.fill("#token", tokens["alpha"])
                page.click("button[type=submit]")
                page.wait_for_selector("#subs")
                assert page.inner_text("#team") == "Team alpha"
                rows = page.query_selector_all("tr.sub")
                assert [r.get_attribute("data-id") for r in rows] == [ids["alpha"]]
                assert rows[0].query_selector(".status").inner_text() == "scored"
                assert rows[0].query_selector(".public").inner_text() == f"{scores[ids['alpha']][0]:.4f}"
                content = page.content()
                assert ids["beta"][:12] not in content and tokens["alpha"] not in content
                cookie = next(c for c in page.context.cookies() if c["name"] == "mergelab_session")
                assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
                assert page.evaluate("document.cookie") == ""          # not readable from scripts

                page.goto(server.url + "/")
                page.wait_for_selector("body[data-rendered=yes]")
                shown = {r.query_selector_all("td")[1].inner_text(): [td.inner_text() for td in r.query_selector_all("td")]
                         for r in page.query_selector_all("#rows tr.row")}
                assert set(shown) == {"alpha", "beta"}
                heads = [th.inner_text() for th in page.query_selector_all("#head th")]
                assert not any("private" in h for h in heads)
                for team in ("alpha", "beta"):
                    pub, priv = scores[ids[team]]
                    assert shown[team][4] == f"{pub:.4f}"
                content = page.content()
                assert all(f"{scores[s][1]:.4f}" not in content or f"{scores[s][1]:.4f}" == f"{scores[s][0]:.4f}"
                           for s in scores)
                assert '"private_shown": false' in content and not re.search(r'"private": [-0-9]', content)

                page.goto(server.url + "/team")
                page.click("#logout")
                page.wait_for_selector("#login")
                assert not [c for c in page.context.cookies() if c["name"] == "mergelab_session"]
            finally:
                browser.close()
