"""report.html of `mergelab run`, `mergelab demo` and `mergelab tune`, opened in headless Chromium."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mergelab import htmlpage
from mergelab.run.manifest import VOLATILE_FILES
from mergelab.run.pipeline import run_recipe
from mergelab.run.report import REPORT_NAME, run_report_html
from mergelab.testing import write_mixed_csv


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browser() -> str:
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (`make test` installs it where it can)")
    return exe


def dump_dom(page: Path) -> str:
    r = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def screenshot(page: Path, png: Path, size: str = "1200,2200") -> None:
    r = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={size}", f"--screenshot={png}", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and png.stat().st_size > 10_000, r.stderr[-2000:]


def bars(dom: str, chart_id: str) -> list[dict[str, str]]:
    """The bars of one chart as the browser parsed them: series, category, value."""
    svg = re.search(rf'<svg[^>]*id="{chart_id}".*?</svg>', dom, re.S)
    assert svg, f"no chart {chart_id}"
    return [dict(re.findall(r'data-(series|category|value)="([^"]*)"', m))
            for m in re.findall(r'<rect class="bar"[^>]*>', svg.group(0))]


def table_rows(dom: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]


def no_outside_fetch(text: str) -> None:
    """Nothing is fetched from elsewhere: no script/link/img source, no URL but the SVG namespace."""
    assert "<script" not in text and "<link" not in text and " src=" not in text
    assert "http" not in text.replace("http://www.w3.org/2000/svg", "")


@pytest.fixture
def run_dir(zoo, tmp_path):
    fz = zoo["llama"]
    base = shutil.copytree(fz.base, tmp_path / "base")
    experts = [shutil.copytree(e, tmp_path / f"e{i}") for i, e in enumerate(fz.experts[:2])]
    write_mixed_csv(tmp_path / "arith.csv", 4, choice_input="Is {i} even?", choices=["yes", "no"],
                    gen_input="Count to {i}", gen_target="1 2")
    write_mixed_csv(tmp_path / "count.csv", 4, choice_input="Is {i} odd?", choices=["no", "yes"],
                    gen_input="Say {i}", gen_target="{i}")
    recipe = {"base": {"path": str(base)},
              "experts": [{"path": str(e), "weight": w} for e, w in zip(experts, (0.6, 0.4))],
              "method": {"name": "ties", "density": 0.5}, "seed": 3,
              "eval": {"data": ["arith.csv", "count.csv"], "max_new_tokens": 3, "batch_size": 4}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_recipe(path, tmp_path / "run", rules=False, budget="60m")
    return tmp_path / "run", result


def test_run_writes_a_report_page_that_renders_its_figures(run_dir, tmp_path):
    out, result = run_dir
    page = out / REPORT_NAME
    text = page.read_text()
    no_outside_fetch(text)
    assert REPORT_NAME in VOLATILE_FILES and not any(REPORT_NAME in k for k in result.manifest["outputs"])
    dom = dump_dom(page)
    scores = json.loads((out / "eval" / "scores.json").read_text())
    # the scores table and the chart: one bar per task, with the merge's figures
    rows = table_rows(dom, "scoretable")
    assert [r[0] for r in rows] == ["arith", "count", "overall"]
    assert rows[0][2] == htmlpage.fmt_number(scores["files"]["arith.csv"]["score"])
    assert rows[2][2] == htmlpage.fmt_number(scores["overall"]["score"])
    score_bars = bars(dom, "scorechart")
    assert [(b["series"], b["category"]) for b in score_bars] == [("merge", "arith"), ("merge", "count")]
    assert score_bars[1]["value"] == f"{scores['files']['count.csv']['score']:.2f}"
    # planned vs measured time per stage (a budget gives the plan)
    stage_rows = {r[0]: r for r in table_rows(dom, "stages")}
    assert {"resolve", "rules", "merge", "eval"} <= set(stage_rows) and stage_rows["rules"][1] == "off"
    planned = result.manifest["budget"]["planned"]
    time_bars = bars(dom, "timechart")
    assert {(b["series"], b["category"]) for b in time_bars} >= {("planned", "merge"), ("measured", "merge"),
                                                                   ("planned", "eval"), ("measured", "eval")}
    assert next(b for b in time_bars if b["series"] == "planned" and b["category"] == "merge")["value"] \
        == f"{planned['merge']:.1f}"
    # the recipe shown; the hashes folded away
    assert "ties" in re.search(r'<section id="recipe">.*?</section>', dom, re.S).group(0)
    hashes = re.search(r'<section id="hashes">.*?</section>', dom, re.S).group(0)
    assert "<details>" in hashes and "<details open" not in hashes
    first_out, digest = next(iter(result.manifest["outputs"].items()))
    assert first_out in hashes and digest in hashes
    screenshot(page, tmp_path / "run-report.png")


def test_a_run_report_shows_base_and_experts_when_known_and_says_so_when_not():
    manifest = {"recipe": {"method": {"name": "linear"}, "experts": [{}, {}], "output": {"format": "full"}},
                "timings": {"resolve": 0.1, "merge": 2.0}, "rules": "not checked (--no-rules)",
                "outputs": {"model/a.safetensors": "ab" * 32}}
    scores = {"files": {f"{t}.csv": {"rows": 4, "score": s, "not_reached": 0,
                                     "multiple_choice": {"accuracy": s}, "generation": {"exact_match": None}}
                        for t, s in (("mc", 0.5), ("gen", 0.25))},
              "overall": {"rows": 8, "score": 0.375, "not_reached": 0, "multiple_choice": {"accuracy": 0.375},
                          "generation": {"exact_match": None}}}
    page = run_report_html(manifest, scores=scores,
                           reference={"base": {"mc": 0.25, "gen": 0.0}, "experts": {"mc": 0.75, "gen": 0.5}})
    assert page == run_report_html(manifest, scores=scores,   # deterministic bytes
                                   reference={"base": {"mc": 0.25, "gen": 0.0}, "experts": {"mc": 0.75, "gen": 0.5}})
    assert len(bars(page, "scorechart")) == 6   # 2 tasks × (base, experts, merge)
    assert 'data-series="experts" data-category="gen" data-value="0.50"' in page
    plain = run_report_html(manifest, scores=scores)
    assert [b["series"] for b in bars(plain, "scorechart")] == ["merge", "merge"]
    assert "Only the merge&#x27;s own scores are known" in plain
    assert "not checked" in plain and "no budget was given" in plain


def demo_payload() -> dict:
    from mergelab.zoo.demo import DEMO_MERGES, summarise
    from mergelab.zoo.tasks import TASKS

    tasks = list(TASKS)
    base = {t: 0.1 + 0.05 * i for i, t in enumerate(tasks)}
    expert = {t: 0.8 for t in tasks}
    merges = {m.label: {"scores": {t: round(0.3 + 0.07 * i + 0.01 * j, 2) for i, t in enumerate(tasks)},
                        "merge_s": 1.0, "eval_s": 2.0, "method": m.method, "output": m.output, "about": m.about}
              for j, m in enumerate(DEMO_MERGES)}
    return {"base": "HuggingFaceTB/SmolLM2-135M-Instruct", "note": "not legal", "zoo": "/zoo",
            "tasks": {t: {"eval_type": TASKS[t].eval_type, "skill": TASKS[t].skill, "test_rows": 40} for t in tasks},
            "metric": "accuracy", "base_scores": base, "expert_scores": expert, "merges": merges,
            "summary": summarise(tasks, base, expert, merges),
            "timings": {"zoo_s": 1.0, "reference_eval_s": 2.0, "total_s": 30.0}}


def test_the_demo_page_renders_methods_by_tasks_and_its_chart(tmp_path):
    from mergelab.zoo.demo import demo_report_html

    p = demo_payload()
    text = demo_report_html(p)
    assert text == demo_report_html(p)
    no_outside_fetch(text)
    page = tmp_path / "report.html"
    page.write_text(text)
    dom = dump_dom(page)
    rows = table_rows(dom, "scoretable")
    assert [r[0] for r in rows] == ["base", "experts (own task)", *p["merges"]]
    tasks = list(p["tasks"])
    assert rows[3][1 + tasks.index("sql")] == f"{p['merges']['task_arithmetic']['scores']['sql']:.4f}"
    chart = bars(dom, "scorechart")
    assert len(chart) == len(tasks) * (1 + len(p["merges"]))   # one bar per task and model (base + merges)
    ties_sql = next(b for b in chart if b["series"] == "ties" and b["category"].startswith("sql"))
    assert ties_sql["value"] == f"{p['merges']['ties']['scores']['sql'] / 0.8:.2f}"
    screenshot(page, tmp_path / "demo-report.png", size="1200,1400")


def test_the_demo_page_and_markdown_flag_a_task_below_the_base(tmp_path):
    from mergelab.zoo.demo import demo_report_html, report_markdown, summarise

    p = demo_payload()
    tasks = list(p["tasks"])
    p["base_scores"]["sql"] = 0.5
    p["merges"]["linear"]["scores"]["sql"] = 0.45
    p["summary"] = summarise(tasks, p["base_scores"], p["expert_scores"], p["merges"])
    assert p["summary"]["linear"]["below_base"] == ["sql"]
    assert all(s["below_base"] == [] for k, s in p["summary"].items() if k != "linear")
    page = tmp_path / "report.html"
    page.write_text(demo_report_html(p))
    dom = dump_dom(page)
    cells = re.findall(r'<td class="num bad" title="([^"]*)">([^<]*)</td>', dom)
    assert cells == [("below the base model (0.5000)", "0.4500 ▼")]
    assert "▼ below the base model (merging is worse there than not merging): linear on sql (0.45 &lt; 0.50)." in dom
    md = report_markdown(p)
    linear = next(line for line in md.splitlines() if line.startswith("| **linear** |"))
    assert "0.45 (56%) ▼" in linear and md.count("▼") == 2   # the cell and the line under the table
    assert "linear on sql (0.45 < 0.50)" in md
    # without a task below the base the page says so
    assert "No merge scores below the base model on any task." in demo_report_html(demo_payload())


def test_the_tune_page_renders_the_search_curve(tmp_path):
    from types import SimpleNamespace

    from mergelab.tune.study import TrialRecord, TuneResult, report_html

    trials = [TrialRecord(i, s, c, {"lambda": 0.1 * i}, 1.5) for i, (s, c) in
              enumerate([(0.4, 0.38), (0.55, 0.5), (0.5, 0.52), (0.62, 0.57), (0.6, 0.6)])]
    result = TuneResult(tmp_path, "study-x", "sqlite:///x.db", "maximize", trials[3], trials, 0, "trials", [],
                        8.0, 5)
    section = SimpleNamespace(divergence=0.05, objective="accuracy", sampler="tpe", seed=0)
    page = tmp_path / "report.html"
    page.write_text(report_html(result, Path("recipe.yaml"), section, ["lambda"]))
    no_outside_fetch(page.read_text())
    dom = dump_dom(page)
    svg = re.search(r'<svg[^>]*id="searchchart".*?</svg>', dom, re.S).group(0)
    points = re.findall(r'<circle class="point" data-series="([^"]*)" data-x="([^"]*)" data-y="([^"]*)"', svg)
    assert len(points) == 10 and ("search part (objective)", "3", "0.6200") in points
    assert 'class="step"' in svg and 'class="marker"' in svg
    assert [r[0] for r in table_rows(dom, "trials")] == ["0", "1", "2", "3", "4"]
    screenshot(page, tmp_path / "tune-report.png", size="900,1100")


def test_run_and_eval_print_json_for_scripts(zoo, tmp_path, capsys):
    from mergelab.cli import main

    fz = zoo["llama"]
    write_mixed_csv(tmp_path / "t.csv", 4, choice_input="Is {i} even?", choices=["yes", "no"],
                    gen_input="Count to {i}", gen_target="1 2")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": {"path": str(fz.base)}, "experts": [{"path": str(fz.experts[0])}],
                                      "method": {"name": "linear"}, "eval": {"data": ["t.csv"], "max_new_tokens": 2}}))
    assert main(["run", str(recipe), "--out", str(tmp_path / "r"), "--no-rules", "--quiet", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in doc["stages"]] == ["resolve", "rules", "merge", "eval"]
    assert doc["scores"]["overall"]["rows"] == 4 and doc["report"].endswith("report.html")
    assert main(["eval", str(tmp_path / "r" / "model"), "--data", str(tmp_path / "t.csv"), "--out",
                 str(tmp_path / "e"), "--max-new-tokens", "2", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["overall"]["score"] == doc["scores"]["overall"]["score"]
    assert main(["eval", str(tmp_path / "r" / "model"), "--data", str(tmp_path / "t.csv"), "--out",
                 str(tmp_path / "e"), "--max-new-tokens", "2", "--quiet", "--force"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
