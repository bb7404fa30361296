"""``mergelab push DIR --repo OWNER/NAME``: publish a merge output or a run folder on the Hub.

A merge output (``mergelab merge --out DIR``) is pushed as it is. A run folder (``mergelab run
--out DIR``, it has ``manifest.json``) is pushed as its model at the repository root plus the run's
records under ``mergelab-run/``, and the commit is written into its manifest (``push:``).
"""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("push")
    def push(
        folder: Path = typer.Argument(..., help="A merge output folder or a `mergelab run` folder."),
        repo: str = typer.Option(..., "--repo", metavar="OWNER/NAME", help="Hub repository (created when missing)."),
        private: bool = typer.Option(False, "--private", help="Create the repository private (a new one only)."),
        revision: str = typer.Option(None, "--revision", metavar="BRANCH",
                                     help="Branch to push to (created from main when missing); default main."),
        message: str = typer.Option(None, "--message", "-m", help="Commit message."),
    ) -> None:
        """Upload a merge or run folder to a Hugging Face Hub repository as one commit; print its URL.

        The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT chooses the Hub.
        """
        from mergelab.hub.push import push_files, push_folder
        from mergelab.run.manifest import is_run_folder, record_push, run_push_files

        run = is_run_folder(folder)
        if run:
            result = push_files(run_push_files(folder), repo, private=private, revision=revision,
                                commit_message=message)
            record_push(folder, result.record())
        else:
            result = push_folder(folder, repo, private=private, revision=revision, commit_message=message)
        what = "new commit" if result.changed else "no change: the Hub already holds these files, at commit"
        typer.echo(f"pushed {result.files} files to {result.repo}@{result.revision} ({what} {result.commit_sha[:12]})")
        typer.echo(result.commit_url)
        if run:
            typer.echo(f"recorded in {folder / 'manifest.json'} (push)", err=True)
