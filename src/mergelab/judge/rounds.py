"""``judge round``: judge every submission received since the previous round (and any left
unfinished), on this machine or as Ray tasks, and record each result in one transaction.

A round is opened by one transaction that assigns it every waiting submission. Each judged run's
result (status, scores, predictions, fingerprint) is written in one transaction too, and a
submission that already has a result is never judged again; so a judge killed at any instant
and started again finishes the open round with nothing lost and nothing scored twice.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mergelab.judge.db import connect, transaction
from mergelab.judge.home import Competition, Home, JudgeError
from mergelab.judge.scoring import score
from mergelab.judge.worker import judge_one
from mergelab.run.manifest import now_iso

BACKENDS = ("local", "ray")


@dataclass
class RoundReport:
    round: int | None
    judged: list[dict] = field(default_factory=list)   # {id, team, status, public, wall_s, overhead_s}
    wall_s: float = 0.0
    resumed: bool = False


def open_round(conn) -> tuple[int | None, bool]:
    """The open round (resumed=True), or a new one holding every waiting submission; None when
    nothing waits."""
    with transaction(conn):
        row = conn.execute("SELECT round FROM rounds WHERE finished IS NULL ORDER BY round LIMIT 1").fetchone()
        if row is not None:
            return row["round"], True
        waiting = conn.execute("SELECT COUNT(*) FROM submissions WHERE round IS NULL").fetchone()[0]
        if not waiting:
            return None, False
        r = conn.execute("SELECT COALESCE(MAX(round), 0) + 1 FROM rounds").fetchone()[0]
        conn.execute("INSERT INTO rounds (round, started) VALUES (?, ?)", (r, now_iso()))
        conn.execute("UPDATE submissions SET round = ? WHERE round IS NULL", (r,))
        return r, False


def _spec(home: Home, comp: Competition, row, device: str) -> dict[str, Any]:
    return {"home": str(home.root.resolve()), "id": row["id"], "content": row["content"], "tasks": comp.tasks,
            "time_limit_s": comp.time_limit_s, "memory_bytes": int(comp.memory_limit_gb * (1 << 30)),
            "device": device}


def record(conn, home: Home, comp: Competition, r: int, result: dict[str, Any]) -> dict:
    """Score one worker result and write it (one transaction); returns the summary line."""
    sid, outcome = result["id"], result["outcome"]
    status, scores = result["status"], None
    if status == "ok":
        scores = score(home, comp.tasks, comp.public_fraction, result["predictions"])
        status = "scored"
    with transaction(conn):
        if conn.execute("SELECT 1 FROM results WHERE submission = ?", (sid,)).fetchone():
            return {"id": sid, "status": "already recorded"}
        conn.execute(
            "INSERT INTO results (submission, round, status, public_score, private_score, tasks, wall_s, "
            "peak_mem_mb, limit_s, manifest, log_tail, isolation, detail, finished) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sid, r, status, scores.public if scores else None, scores.private if scores else None,
             json.dumps(scores.tasks if scores else {}), outcome["wall_s"], outcome["peak_mem_mb"],
             comp.time_limit_s, json.dumps(result["manifest"]) if result["manifest"] else None,
             outcome["log_tail"], json.dumps(outcome["isolation"]), result["detail"], now_iso()))
        if scores:
            conn.executemany("INSERT INTO predictions (submission, task, row_id, prediction, correct) "
                             "VALUES (?, ?, ?, ?, ?)", [(sid, *row) for row in scores.rows])
        if result.get("fingerprint"):
            conn.execute("INSERT INTO fingerprints (submission, vector) VALUES (?, ?)",
                         (sid, json.dumps(result["fingerprint"])))
        conn.execute("UPDATE submissions SET status = ? WHERE id = ?", (status, sid))
    return {"id": sid, "status": status, "public": scores.public if scores else None,
            "wall_s": outcome["wall_s"], "worker_s": result.get("worker_s")}


def run_round(root: str | Path, *, backend: str = "local", address: str | None = None, device: str = "auto",
              progress: Callable[[str], None] | None = None) -> RoundReport:
    """Judge the open round (or a new one) to the end; see the module doc."""
    if backend not in BACKENDS:
        raise JudgeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    say = progress or (lambda msg: None)
    home = Home(Path(root))
    comp = home.load()
    conn = connect(home.database)
    t0 = time.monotonic()
    try:
        r, resumed = open_round(conn)
        report = RoundReport(r, resumed=resumed)
        if r is None:
            say("no submission is waiting: no round to judge")
            return report
        say(f"round {r}" + (" (resumed)" if resumed else ""))
        todo = conn.execute("SELECT s.id, s.team, s.content FROM submissions s LEFT JOIN results x "
                            "ON x.submission = s.id WHERE s.round = ? AND s.status IN ('received', 'judging') "
                            "AND x.submission IS NULL ORDER BY s.seq", (r,)).fetchall()
        teams = {row["id"]: row["team"] for row in todo}
        specs = [_spec(home, comp, row, device) for row in todo]
        with transaction(conn):
            conn.executemany("UPDATE submissions SET status = 'judging' WHERE id = ?", [(s["id"],) for s in specs])

        def done(result: dict) -> None:
            t_rec = time.monotonic()
            line = record(conn, home, comp, r, result)
            line["team"] = teams[result["id"]]
            if line.get("worker_s") is not None:
                line["overhead_s"] = line["worker_s"] - line["wall_s"] + (time.monotonic() - t_rec)
            report.judged.append(line)
            score_text = f" public {line['public']:.4f}" if line.get("public") is not None else ""
            say(f"{line['team']}: {result['id'][:12]} {line['status']}{score_text}")

        if backend == "local":
            for spec in specs:
                try:
                    result = judge_one(spec)
                except Exception as exc:  # noqa: BLE001 - a judged run never crashes the judge
                    result = _failed(spec, f"the judge could not run it: {type(exc).__name__}: {exc}")
                done(result)
        else:
            _run_on_ray(specs, address, done)
        with transaction(conn):
            conn.execute("UPDATE rounds SET finished = ? WHERE round = ?", (now_iso(), r))
        report.wall_s = time.monotonic() - t0
        return report
    finally:
        conn.close()


def _run_on_ray(specs: list[dict], address: str | None, done: Callable[[dict], None]) -> None:
    """Each judged run is one Ray task (one GPU each where the cluster has GPUs)."""
    try:
        import ray
    except ImportError:
        raise JudgeError("--backend ray needs Ray", hint="pip install 'mergelab[cluster]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(judge_one)
    pending = {task.remote(spec): spec for spec in specs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            spec = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a lost worker is a failed run, not a judge crash
                result = _failed(spec, f"ray task failed: {exc}")
            done(result)


def _failed(spec: dict, detail: str) -> dict:
    return {"id": spec["id"], "status": "failed", "detail": detail[:500], "predictions": None, "fingerprint": None,
            "manifest": None, "outcome": {"wall_s": 0.0, "peak_mem_mb": 0.0, "log_tail": "", "isolation": {}}}
