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
