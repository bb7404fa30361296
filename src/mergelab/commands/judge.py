"""``mergelab judge``: the organizer's side (init, submit, round, leaderboard, finalize, similar, verify,
serve, team add/revoke/list)."""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import List, Optional

import typer

from mergelab.judge import leaderboard as lb
from mergelab.judge.home import init_home
from mergelab.judge.intake import submit
from mergelab.judge.rounds import run_round
from mergelab.judge.service import serve
from mergelab.judge.similar import Thresholds, compare, table
from mergelab.judge.teams import add_team, list_teams, revoke_team
from mergelab.judge.verify import verify


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def register(app: typer.Typer) -> None:
    judge = typer.Typer(help="The organizer's judge: a competition home, submissions, rounds, leaderboards.",
                        no_args_is_help=True)
    app.add_typer(judge, name="judge")

    @judge.command("init")
    def init_cmd(
        home: Path = typer.Argument(..., help="New competition home folder.", show_default=False),
        more: Optional[List[str]] = typer.Argument(None, help="More task files (what a shell makes of "
                                                   "--tasks hidden/*.csv).", show_default=False),
        tasks: List[str] = typer.Option(..., "--tasks", help="Hidden task CSV files (with targets); globs work."),
        cutoff: str = typer.Option("2024-05-31", "--cutoff", help="Models must be uploaded on or before this date."),
        max_params: float = typer.Option(8e9, "--max-params", help="Largest allowed model (parameters)."),
        budget: str = typer.Option("60m", "--budget", help="Time budget of a run on the reference card (A6000)."),
        hardware: str = typer.Option("a6000", "--hardware", help="Profile of the judge's own machine."),
        calibrate: bool = typer.Option(False, "--calibrate", help="Measure this machine instead of a profile."),
        speed_factor: Optional[float] = typer.Option(None, "--speed-factor",
                                                     help="Judge speed / A6000 speed (overrides the profile)."),
        memory_gb: float = typer.Option(64.0, "--memory-gb", help="Memory cap of a judged run (GiB)."),
        per_round: Optional[int] = typer.Option(None, "--per-round", help="Submissions per team per round."),
        public: float = typer.Option(0.3, "--public", help="Share of hidden rows in the public part."),
    ) -> None:
        """Create a competition home from the hidden task files."""
        files = [f for pattern in [*tasks, *(more or [])] for f in (sorted(glob.glob(pattern)) or [pattern])]
        h = init_home(home, files, cutoff=cutoff, max_params=int(max_params), budget=budget, hardware=hardware,
                      calibrate_here=calibrate, speed_factor=speed_factor, memory_limit_gb=memory_gb,
                      submissions_per_round=per_round, public_fraction=public)
        comp = h.load()
        typer.echo(f"competition home {h.root}: {len(comp.tasks)} task(s), time limit per run "
                   f"{comp.time_limit_s:.0f} s (budget {comp.budget} x speed factor {comp.speed_factor:.3g})")

    @judge.command("submit")
    def submit_cmd(
        home: Path = typer.Argument(..., help="Competition home.", show_default=False),
        submission: Path = typer.Argument(..., help="Folder or .tar.gz with recipe.yaml.", show_default=False),
        team: str = typer.Option(..., "--team", help="Team name."),
    ) -> None:
        """Validate a submission, store it and print the receipt."""
        typer.echo(submit(home, submission, team).text())

    @judge.command("round")
    def round_cmd(
        home: Path = typer.Argument(..., help="Competition home.", show_default=False),
        backend: str = typer.Option("local", "--backend", help="local (child processes here) or ray."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (with --backend ray)."),
        device: str = typer.Option("auto", "--device", help="Device of judged runs: auto, cpu or cuda."),
    ) -> None:
        """Judge every submission received since the previous round (and any left unfinished)."""
        report = run_round(home, backend=backend, address=address, device=device, progress=_say)
        if report.round is None:
            typer.echo("nothing to judge")
            return
        typer.echo(f"round {report.round}: {len(report.judged)} judged in {report.wall_s:.1f} s")
        for line in report.judged:
            score = f"  public {line['public']:.4f}" if line.get("public") is not None else ""
            typer.echo(f"  {line['team']}  {line['id'][:12]}  {line['status']}{score}")

    @judge.command("leaderboard")
    def leaderboard_cmd(
        home: Path = typer.Argument(..., help="Competition home.", show_default=False),
        private: bool = typer.Option(False, "--private", help="Show the private part (organizer only)."),
        html: Optional[Path] = typer.Option(None, "--html", help="Also write a static HTML page here."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Each team's best scored submission, and the history by round."""
        board = lb.build(home, private=private)
        if html is not None:
            html.write_text(lb.html_page(board), encoding="utf-8")
        typer.echo(json.dumps(board.to_dict(), indent=2) if as_json else lb.text(board), nl=False)

    @judge.command("finalize")
    def finalize_cmd(home: Path = typer.Argument(..., help="Competition home.", show_default=False)) -> None:
        """End the season: the leaderboard shows and ranks by the private scores."""
        typer.echo(f"finalized at {lb.finalize(home)}")

    @judge.command("similar")
    def similar_cmd(
        home: Path = typer.Argument(..., help="Competition home.", show_default=False),
        round_: Optional[int] = typer.Option(None, "--round", help="Only the submissions of this round."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Pairs of submissions from different teams that look like copies (evidence only)."""
        pairs = compare(home, round_=round_, thresholds=Thresholds())
        typer.echo(json.dumps([p.to_dict() for p in pairs], indent=2) if as_json else table(pairs), nl=False)

    @judge.command("verify")
    def verify_cmd(
        home: Path = typer.Argument(..., help="Competition home.", show_default=False),
        submission: str = typer.Argument(..., help="Submission id (or its first characters).", show_default=False),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    ) -> None:
        """Rerun a scored submission and report differing outputs (exit status 1 when any differ)."""
        report = verify(home, submission, device=device)
        if report.reproduced:
            typer.echo(f"{report.submission[:12]}: reproduced, every output file has the same bytes")
            return
        typer.echo(f"{report.submission[:12]}: {report.status}")
        for d in report.differences:
            typer.echo(f"  {d}")
        if not report.differences:
            typer.echo(report.log_tail[-1500:])
        raise typer.Exit(1)

    @judge.command("serve")
    def serve_cmd(
        home: Path = typer.Argument(..., help="Competition home.", show_default=False),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (put a TLS reverse proxy in "
                                 "front for anything but the loopback)."),
        port: int = typer.Option(8000, "--port", help="Port to listen on."),
        log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    ) -> None:
        """Serve the submission API, the team page and the public leaderboard (FastAPI + uvicorn)."""
        serve(home, host=host, port=port, log_level=log_level)

    team = typer.Typer(help="Team tokens for `judge serve`.", no_args_is_help=True)
    judge.add_typer(team, name="team")

    @team.command("add")
    def team_add_cmd(
        home: Path = typer.Argument(..., help="Competition home.", show_default=False),
        name: str = typer.Argument(..., help="Team name.", show_default=False),
    ) -> None:
        """Issue a token for a team; it is printed once and only its salted hash is kept."""
        token = add_team(home, name)
        typer.echo(token)
        _say(f"token of team {name} (shown once; only its salted hash is stored): give it to the team")

    @team.command("revoke")
    def team_revoke_cmd(
        home: Path = typer.Argument(..., help="Competition home.", show_default=False),
        name: str = typer.Argument(..., help="Team name.", show_default=False),
    ) -> None:
        """Revoke a team's token (its requests answer 401 at once)."""
        n = revoke_team(home, name)
        typer.echo(f"team {name}: {n} token(s) revoked" if n else f"team {name} has no active token")

    @team.command("list")
    def team_list_cmd(home: Path = typer.Argument(..., help="Competition home.", show_default=False)) -> None:
        """The teams with tokens (no token is shown)."""
        for t in list_teams(home):
            typer.echo(f"{t['team']}  created {t['created']}" + (f"  revoked {t['revoked']}" if t["revoked"] else ""))
