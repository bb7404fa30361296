"""The CLI: version, help, and the user-error path (one message, exit status 2, no traceback)."""
from __future__ import annotations

import subprocess
import sys

from mergelab import __version__
from mergelab.cli import app, main
from mergelab.errors import MergelabError, RecipeError


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mergelab", *args], capture_output=True, text=True)


def test_version_and_help():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mergelab {__version__}"
    r = _run("--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_every_subcommand_has_help():
    import typer.main

    group = typer.main.get_command(app)
    for name in group.commands:
        r = _run(name, "--help")
        assert r.returncode == 0, (name, r.stderr)
        assert "Usage" in r.stdout


def _boom_command():
    @app.command("_boom", hidden=True)
    def boom():  # a command that fails the way user errors fail
        raise RecipeError("recipe.yaml: key 'method.name' is 'tiez'", hint="use one of: ties, linear")


def test_user_error_is_one_message_with_exit_2(capsys):
    _boom_command()
    code = main(["_boom"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and "method.name" in err and "hint: use one of" in err
    assert "Traceback" not in err


def test_debug_shows_traceback(capsys):
    _boom_command()
    code = main(["--debug", "_boom"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err


def test_all_user_errors_share_one_base():
    import mergelab.errors as e

    kinds = [getattr(e, n) for n in dir(e) if n.endswith("Error") and n != "MergelabError"]
    assert kinds and all(issubclass(k, MergelabError) for k in kinds)


def test_exit_status_of_a_command_is_kept():
    import typer

    @app.command("_exit3", hidden=True)
    def exit3():
        raise typer.Exit(3)

    assert main(["_exit3"]) == 3


def test_usage_errors_are_one_message_with_exit_2():
    """Unknown commands, unknown options and missing arguments: click's usage message, no traceback
    (typer ≥ 0.24 raises them from its own copy of click)."""
    for args, expected in ((["nosuchcommand"], "No such command 'nosuchcommand'"),
                           (["merge", "--bogus"], "No such option: --bogus"),
                           (["merge"], "Missing argument")):
        r = _run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert expected in r.stderr and "Usage: mergelab" in r.stderr
        assert "Traceback" not in r.stderr
