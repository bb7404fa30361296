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

