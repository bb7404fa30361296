"""``mergelab submit SUBMISSION --to URL --token T``: a team sends a submission to a judge service."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from mergelab.judge.client import receipt_text, upload
from mergelab.judge.home import JudgeError
from mergelab.progress import ProgressBar


def _columns():
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

    return (TextColumn("upload {task.fields[filename]}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())


def register(app: typer.Typer) -> None:
    @app.command("submit")
    def submit_cmd(
        submission: Path = typer.Argument(..., help="Folder or .tar.gz with recipe.yaml.", show_default=False),
        to: str = typer.Option(..., "--to", help="The judge's address, e.g. https://judge.example.org"),
        token: Optional[str] = typer.Option(None, "--token", help="Your team token (default: $MERGELAB_TOKEN)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the upload progress bar."),
    ) -> None:
        """Send a submission to the judge and print the receipt (exit 1 when it is rejected)."""
        token = token or os.environ.get("MERGELAB_TOKEN")
        if not token:
            raise JudgeError("no team token", hint="pass --token T or set MERGELAB_TOKEN")
        bars: list[ProgressBar] = []

        def step(done: int, total: int) -> None:      # the first call knows the archive's size
            if not bars:
                bars.append(ProgressBar(progress, _columns, total, filename=submission.name).__enter__())
            bars[0].update(completed=done)

        try:
            answer = upload(to, token, submission, progress=step)
        finally:
            if bars:
                bars[0].__exit__(None, None, None)
        body = answer.body
        if "id" in body:
            typer.echo(receipt_text(body))
        if answer.status == 422:
            raise typer.Exit(1)
        if not answer.accepted:
            raise JudgeError(f"the judge refused the submission ({answer.status}): {body.get('error', '')}"
                             + "".join(f"\n  {r}" for r in body.get("reasons") or []))
