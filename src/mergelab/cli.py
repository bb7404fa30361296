"""L6 — the ``mergelab`` command line.

Each subcommand is a thin function in :mod:`mergelab.commands` that calls the library. User errors
(:class:`~mergelab.errors.MergelabError`) are printed as one readable message with exit status 2;
``--debug`` shows the traceback as well.
"""
from __future__ import annotations

import importlib
import sys

import click
import typer
from rich.console import Console
from rich.markup import escape

from mergelab import __version__
from mergelab.errors import MergelabError, OutputWriteError

try:  # newer typer raises the exceptions of its own copy of click
    from typer._click import ClickException as _TyperClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    _TyperClickException = click.ClickException
_EXIT = (click.exceptions.Exit, typer.Exit)
_USAGE = (click.ClickException, _TyperClickException)
_ABORT = (click.exceptions.Abort, typer.Abort)

app = typer.Typer(
    name="mergelab",
    help="Merge language models and LoRA adapters; check competition rules; evaluate; reproduce.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}
err_console = Console(stderr=True)

# Subcommand modules; each defines ``register(app)``. A module that is not there yet is skipped.
COMMAND_MODULES = ("merge", "evaluate", "run", "check", "push", "zoo", "tune", "plan", "judge", "submit")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mergelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """mergelab: merging for the LLM Merging Competition and beyond."""
    _state["debug"] = debug


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mergelab.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mergelab.commands.{name}":
                continue
            raise
        module.register(app)


_register_commands()


INTERRUPTED = 130   # typer turns Ctrl-C (KeyboardInterrupt) into this status, silently


def _option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def interrupted_message(argv: list[str]) -> str:
    """The one line shown after Ctrl-C: what became of the command's output."""
    command = next((a for a in argv if not a.startswith("-")), "")
    out = _option(argv, "--out", "-o")
    if out is None:
        return "interrupted"
    if command in ("run", "reproduce"):
        return (f"interrupted; the stages finished so far are recorded in {out}/manifest.json: "
                "run the same command again to resume")
    if command == "tune":
        return f"interrupted; the trials finished so far are kept in the study (see {out})"
    return f"interrupted; nothing was written to {out} (it was left as it was)"


def _print_error(exc: MergelabError) -> int:
    if _state["debug"]:
        err_console.print_exception()
    # soft_wrap: never hard-wrap a message at the console width (a wrapped path cannot be copied)
    err_console.print("[bold red]error:[/] " + escape(str(exc)), highlight=False, soft_wrap=True)
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in argv
    try:
        rc = app(args=argv, prog_name="mergelab", standalone_mode=False)
    except MergelabError as exc:
        return _print_error(exc)
    except _EXIT as exc:
        rc = exc.exit_code
    except _USAGE as exc:
        exc.show()
        return exc.exit_code
    except (*_ABORT, KeyboardInterrupt):
        rc = INTERRUPTED
    except OSError as exc:   # disk full, read-only, ... anywhere not already mapped: one message too
        mapped = OutputWriteError.from_os_error(exc)
        if mapped is None:
            raise
        mapped.__cause__ = exc
        return _print_error(mapped)
    if rc == INTERRUPTED:
        err_console.print(escape(interrupted_message(argv)), highlight=False, soft_wrap=True)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
