"""What the commands print to a pipe or a log does not depend on a terminal's width."""
from __future__ import annotations

from rich.table import Table

from mergelab.progress import PLAIN_WIDTH, make_console


def test_a_console_that_is_not_a_terminal_never_wraps_or_squeezes(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "40")
    console = make_console()
    assert not console.is_terminal and console.width == PLAIN_WIDTH
    path = "/tmp/" + "/".join(["a-very-long-folder-name"] * 12) + "/model.safetensors"
    console.print(f"wrote {path}", highlight=False)
    table = Table("file", "rows", "accuracy", "overall")
    table.add_row("a_rather_long_competition_file_name.csv", "1234", "0.5678", "0.9")
    console.print(table)
    out = capsys.readouterr().out
    assert f"wrote {path}\n" in out  # one line, the path whole
    assert "a_rather_long_competition_file_name.csv" in out and "overall" in out and "…" not in out



# ------------------------------------------------------------------ 80 columns, NO_COLOR, --json

import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from rich.console import Console  # noqa: E402


def at_width(width: int) -> Console:
    return Console(width=width, file=io.StringIO(), force_terminal=False)


def fake_demo():
    from mergelab.zoo.demo import DEMO_MERGES, summarise
    from mergelab.zoo.tasks import TASKS

    tasks = list(TASKS)
    base, expert = {t: 0.2 for t in tasks}, {t: 0.9 for t in tasks}
    results = {m.label: {"scores": {t: 0.5 + 0.01 * i for i, t in enumerate(tasks)}} for m in DEMO_MERGES}
    return tasks, base, expert, results, summarise(tasks, base, expert, results)


@pytest.mark.parametrize("width", [80, 60, 40])
def test_the_demo_table_fits_the_terminal_with_every_method_name_whole(width):
    from mergelab.zoo.demo import DEMO_MERGES, print_demo_table

    console = at_width(width)
    print_demo_table(*fake_demo(), console)
    out = console.file.getvalue()
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width
    for m in DEMO_MERGES:   # each method's name whole, at the start of its row
        assert any(line.split() and line.split()[0] == m.label for line in lines), m.label
    assert "…" not in out
    if width == 80:   # tasks abbreviated, with the legend
        assert "sent = sentiment" in out and " sent " in out
    else:   # too narrow for the per-task columns: the mean and normalised score, and where the rest is
        assert "per-task scores:" in out and "report.html" in out


def test_the_demo_table_at_a_wide_console_shows_full_task_names():
    from mergelab.zoo.demo import print_demo_table

    console = at_width(240)
    print_demo_table(*fake_demo(), console)
    out = console.file.getvalue()
    assert " sentiment " in out and " normalised " in out and "sent = " not in out


def fake_demo_below_base():
    """The fake demo with the base at 0.6 on grammar: linear (0.50) and ties (0.55) fall below it."""
    from mergelab.zoo.demo import summarise

    tasks, base, expert, results, _ = fake_demo()
    base = {**base, "grammar": 0.6}
    results = {k: {"scores": {**r["scores"], "grammar": 0.5 if k == "linear" else 0.55 if k == "ties" else 0.7}}
               for k, r in results.items()}
    return tasks, base, expert, results, summarise(tasks, base, expert, results)


@pytest.mark.parametrize("width", [240, 80, 40])
def test_the_demo_table_flags_a_task_below_the_base_at_any_width(width):
    from mergelab.zoo.demo import print_demo_table

    demo = fake_demo_below_base()
    assert demo[4]["linear"]["below_base"] == ["grammar"] and demo[4]["ties"]["below_base"] == ["grammar"]
    assert all(s["below_base"] == [] for k, s in demo[4].items() if k not in ("linear", "ties"))
    console = at_width(width)
    print_demo_table(*demo, console)
    out = console.file.getvalue()
    assert max(len(line) for line in out.splitlines()) <= width
    text = " ".join(out.split())   # the line may wrap on a narrow console; its words stay
    assert ("▼ below the base model (merging is worse there than not merging): linear on grammar "
            "(0.50 < 0.60); ties on grammar (0.55 < 0.60).") in text
    if width == 240:   # the per-task cells are shown: the two below the base are marked
        rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
        assert "▼0.50" in rows["linear"] and "▼0.55" in rows["ties"] and "▼" not in rows["regmean"]


def test_the_demo_table_says_when_no_merge_is_below_the_base():
    from mergelab.zoo.demo import print_demo_table

    console = at_width(120)
    print_demo_table(*fake_demo(), console)
    out = console.file.getvalue()
    assert "No merge scores below the base model on any task." in out and "▼" not in out


def test_the_demo_at_columns_80_on_a_terminal(monkeypatch):
    """make_console on a terminal of COLUMNS=80 (FORCE_COLOR makes rich treat the capture as one)."""
    from mergelab.zoo.demo import DEMO_MERGES, print_demo_table

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    console = make_console()
    assert console.is_terminal and console.width == 80
    console.file = io.StringIO()
    print_demo_table(*fake_demo(), console)
    out = console.file.getvalue()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert max(len(line) for line in plain.splitlines()) <= 80
    assert all(m.label in plain for m in DEMO_MERGES)
    assert not re.search(r"\x1b\[(3[0-9]|9[0-7]|38;)", out)   # NO_COLOR: no colour codes (bold may stay)


def test_the_command_tables_fit_80_columns(tmp_path, monkeypatch):
    """run's summary and eval's scores within 80 columns, every header whole."""
    from types import SimpleNamespace

    import mergelab.progress
    from mergelab.commands import evaluate as eval_cmd
    from mergelab.commands import run as run_cmd

    console = at_width(80)
    monkeypatch.setattr(mergelab.progress, "make_console", lambda stderr=False: console)
    stages = [SimpleNamespace(name=n, status=s, seconds=1.0, detail=d) for n, s, d in
              [("resolve", "ran", "3 model(s)"), ("rules", "off", "--no-rules"), ("merge", "ran", "dare_ties"),
               ("eval", "partial", "DEADLINE: 12 of 12 rows not reached (fallback: choice 0 / empty text); "
                                   "score=0.250")]]
    run_cmd._summary(SimpleNamespace(stages=stages, manifest={}, warnings=[], out_dir=tmp_path), "mergelab run")
    part = {"rows": 12, "not_reached": 0, "score": 0.5, "multiple_choice": {"accuracy": 0.5},
            "generation": {"exact_match": 0.25, "rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.5}}
    eval_cmd._print_summary({"files": {"a_rather_long_competition_file_name.csv": part}, "overall": part,
                             "timing": {"rows": 12, "seconds": 3.0, "rows_per_s": 4.0}}, tmp_path)
    out = console.file.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 80
    for header in ("stage", "status", "seconds", "detail", "MC acc", "score", "missed"):
        assert header in out
    assert "…" not in out


# ------------------------------------------- the other tables at 80 columns: check, plan, zoo, judge

from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

HUB_ID = "mistralai/Mistral-7B-Instruct-v0.2@0123456789abcdef0123456789abcdef01234567"
LLAMA_ID = "meta-llama/Meta-Llama-3-8B-Instruct@e1945c40cd546c78e41f1151f4db032b271faeaa"
LOCAL_PATH = "/home/someone/projects/competition/experts/a-very-long-folder-name-for-the-sql-expert/checkpoint-1200"


def terminal80() -> Console:
    return Console(width=80, force_terminal=True, record=True, file=io.StringIO())


def rendered(console: Console) -> str:
    out = console.export_text()
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out, out
    return out


def column(out: str, i: int) -> list[str]:
    """The pieces of a rich table's column ``i`` (0 = the first), one per body line (not the header)."""
    return [line.split("│")[i + 1].strip() for line in out.splitlines() if line.startswith("│")]


def test_the_rules_table_fits_80_columns_with_every_reference_whole():
    from mergelab.hub.rules import RULES, Finding, Report, report_table

    reasons = {"available": "public on the Hub",
               "date": "created 2024-09-18T12:00:00+00:00, after the cut-off 2024-05-31T23:59:59+00:00",
               "params": "8.03B parameters counted from the safetensors headers, 0.4% above 8B (within 10%)",
               "licence": "local folder: its licence cannot be read from the Hub"}
    models = [(HUB_ID, "base"), (LOCAL_PATH, "expert 1"), (LLAMA_ID, "base named by expert 2")]
    statuses = ["ok", "warn", "violation", "unverifiable"]
    findings = [Finding(m, role, rule, statuses[(i + j) % 4], reasons[rule])
                for i, (m, role) in enumerate(models) for j, rule in enumerate(RULES)]
    console = terminal80()
    console.print(report_table(Report(datetime(2024, 5, 31, 23, 59, 59, tzinfo=timezone.utc), 8 * 10 ** 9,
                                      findings)))
    out = rendered(console)
    first = "".join(column(out, 0))
    for model, role in models:   # each reference folded, never cut: its pieces join back
        assert model + role in first
    assert set(filter(None, column(out, 1))) == set(RULES)
    assert set(filter(None, column(out, 2))) == set(statuses)


def test_the_plan_table_fits_80_columns_with_stage_names_and_paths_whole():
    from mergelab.commands.plan import print_plan
    from mergelab.plan import Plan, StageEstimate, get_profile

    data = "/home/someone/projects/competition/data/the-unlabelled-rows-of-every-task.csv"
    stages = [StageEstimate("statistics", 120.0, 17e9, f"3 expert(s), 123456 tokens through the experts' models, "
                                                      f"{data}"),
              StageEstimate("merge", 300.0, 18e9, "3 expert(s), 48.2 GB read, 16.1 GB written, 2 passes (dare_ties)"),
              StageEstimate("finetune", 900.0, 30e9, "200 steps × 8 rows × 512 tokens, LoRA r=16"),
              StageEstimate("eval", 1500.0, 60e9, "1200 multiple-choice + 800 generation rows; 1234567 prefill "
                                                  "tokens; 51200 decode steps")]
    probe = {"device": "cuda:0 (NVIDIA RTX A6000)", "threads": 16, "matmul_flops": 1.2e14, "copy_bandwidth": 6e11}
    console = terminal80()
    print_plan(Plan(get_profile("a6000"), 3600, stages, {}, probe=probe, notes=["a note " * 20]), console)
    out = rendered(console)
    assert [s for s in column(out, 0) if s] == ["statistics", "merge", "finetune", "eval", "total"]
    assert all(re.fullmatch(r"\d+\.\d (s|min)", t) for t in column(out, 1) if t)
    assert all(re.fullmatch(r"\d+\.\d [kMG]?B", m) for m in column(out, 2) if m)
    assert data in "".join(column(out, 3))   # the path folds, whole
    assert "dare_ties" in out and "does not fit" in out


def test_the_zoo_tables_fit_80_columns():
    from mergelab.cli import main
    from mergelab.zoo.build import Zoo, print_expert_table
    from mergelab.zoo.tasks import TASKS

    tasks = list(TASKS)
    assert len(tasks) >= 6
    console = terminal80()
    print_expert_table(Zoo(Path("/z"), Path("/z/base"), tasks), {t: 0.1 for t in tasks},
                       {t: 0.9 if i % 2 else 0.25 for i, t in enumerate(tasks)}, console)
    out = rendered(console)
    assert [c for c in column(out, 0) if c] == tasks
    assert column(out, 6) == ["✗ no", "✓ yes"] * 3 and "clear: the expert beats the base by at least" in out

    console = terminal80()
    import mergelab.progress
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mergelab.progress, "make_console", lambda stderr=False: console)
        assert main(["zoo", "tasks"]) == 0
    out = rendered(console)
    assert [c for c in column(out, 0) if c] == tasks and "steps" in out
    assert [c for c in column(out, 3) if c] == [str(t.steps) for t in TASKS.values()]
    for t in TASKS.values():   # each skill wraps at spaces, whole
        assert t.skill.replace(" ", "") in "".join(column(out, 2)).replace(" ", "")


LONG_TASKS = ["sentiment_analysis", "topic_classification", "grammar", "json_extraction", "sql_generation",
              "dates", "math_word_problems"]
LONG_TEAM = "the-merge-masters-from-tuebingen"


def a_board(tasks, teams, private):
    from mergelab.judge.leaderboard import Board

    rows = [{"rank": i, "team": t, "submission": f"{i}a2b3c4d5e6f7a8b9c0d", "round": 2, "public": 0.9 - i / 10,
             "private": 0.8 - i / 10, "tasks": {k: {"public": 0.5 + j / 100} for j, k in enumerate(tasks)}}
            for i, t in enumerate(teams, 1)]
    why = "expert 2: mistralai/Mistral-7B-Instruct-v0.2 must be pinned to a 40-hex commit sha (got main); " * 3
    history = {t: [{"submission": "0123456789abcdef", "round": 1, "status": "scored", "public": 0.5, "private": 0.4},
                   {"submission": "fedcba9876543210", "round": 2, "status": "rejected", "public": None,
                    "private": None, "why": why}] for t in teams}
    return Board(tasks, None, private, rows, history)


@pytest.mark.parametrize("private", [False, True])
def test_the_leaderboard_text_wraps_its_task_columns_within_80_columns(private):
    from mergelab.judge.leaderboard import text

    teams = ["alpha", LONG_TEAM, "gamma"]
    out = text(a_board(LONG_TASKS, teams, private))
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…)" in out   # only the long reason is shortened
    assert lines[1].split()[:6] == ["rank", "team", "submission", "round", "public"] + (["private"] if private else [])
    assert [ln.split()[1] for ln in lines[2:5]] == teams and "0.8000" in lines[2]
    heads = [ln.split() for ln in lines if ln.startswith("rank  team")]
    assert len(heads) > 1 and all(h[:2] == ["rank", "team"] for h in heads)
    assert [w for h in heads[1:] for w in h[2:]] == LONG_TASKS   # every task whole, once, in order
    assert sum(ln.split()[:2] == ["2", LONG_TEAM] for ln in lines) == len(heads)   # each block names the team
    assert "the task columns: each task's public score" in out
    assert f"  {LONG_TEAM}  round 2  fedcba987654  rejected  public -" in out


def test_the_leaderboard_text_with_few_tasks_stays_one_table():
    from mergelab.judge.leaderboard import text

    lines = text(a_board(["mc", "gen"], ["alpha", "beta", "gamma"], False)).splitlines()
    assert lines[1].split() == ["rank", "team", "submission", "round", "public", "mc", "gen"]
    assert [ln.split()[1] for ln in lines[2:5]] == ["alpha", "beta", "gamma"] and lines[5] == ""
    assert "private" not in lines[1] and sum(ln.startswith("rank") for ln in lines) == 1


def test_judge_similar_fits_80_columns_with_team_names_whole():
    from mergelab.judge.similar import Pair, table

    copy = ["predictions agree on 95% of 22 rows where independent models would agree on 40% (z = 5.3)",
            "task vectors have cosine 0.987",
            "equivalent recipes: same models and method dare_ties, parameters within 5%"]
    other = "deep-learning-collective-zurich"
    pairs = [Pair("1a2b3c4d5e6f7a8b", "9f8e7d6c5b4a3f2e", "alpha", "beta", 22, 0.95, 0.4, 5.3, 0.987, True, "", copy),
             Pair("1a2b3c4d5e6f7a8b", "5555aaaa5555bbbb", "alpha", "gamma", 22, 0.5, 0.45, 0.4, 0.1, False),
             Pair("77777777aaaa", "88888888bbbb", LONG_TEAM, other, 1234, 0.5, 0.45, float("inf"), None, False, "",
                  ["task vectors have cosine 0.953"]),
             Pair("66666666cccc", "99999999dddd", "a" * 64, "b" * 64, 7, 0.5, 0.5, 0.0, -0.5, False)]
    out = table(pairs)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == ["flag", "teams", "submissions", "rows", "agree", "expect", "z", "cosine", "recipe"]
    assert lines[1].startswith("FLAG  alpha / beta") and lines[1].split()[4:] == [
        "1a2b3c4d/9f8e7d6c", "22", "0.950", "0.400", "5.3", "0.987", "same"]
    assert f"FLAG  {LONG_TEAM} / {other}" in lines
    assert lines[lines.index(f"FLAG  {LONG_TEAM} / {other}") + 1].split() == [
        "77777777/88888888", "1234", "0.500", "0.450", "inf", "-", "-"]
    words = out.split()
    assert "a" * 64 in words and "b" * 64 in words and other in words
    assert "agree: share of the common rows" in out and "nothing is disqualified" in out
