"""Helpers for the judge service's tests and ``bench/judge_service.py`` (the product never imports them).

- :func:`make_home`: a competition home with the two tiny hidden tasks and the service limits given;
- :func:`tiny_archive`: a small, valid, unique submission (its models are folders inside it, so the
  intake needs no Hub);
- :class:`Server`: ``mergelab judge serve`` in a child process on 127.0.0.1 (a free port), its
  output in a log file, stopped with SIGTERM;
- :func:`stub_judge_one` / :func:`round_loop`: ``judge round`` with the judged run replaced by a
  stub that predicts at random (no model is run) — the round's own database work (opening the
  round, recording each result in one transaction, the leaderboard read) is the real code, so a
  loop of them in another process exercises the service and a round on one database.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx2
import yaml

from mergelab.evaluate import read_competition_csv
from mergelab.judge import leaderboard, rounds
from mergelab.judge.db import connect
from mergelab.judge.home import init_home
from mergelab.judge.intake import content_hash
from mergelab.testing.judge_season import write_tasks

RECIPE = {"base": {"path": "base"}, "experts": [{"path": "e1"}], "method": {"name": "linear"}}


def make_home(root: Path, **limits) -> Path:
    """A competition home at ``root`` (tasks in ``root``.hidden), with ``limits`` written into competition.yaml."""
    tasks = write_tasks(root.parent / f"{root.name}.hidden")
    init_home(root, tasks, hardware="cpu")
    cfg = root / "competition.yaml"
    data = yaml.safe_load(cfg.read_text())
    data.update(limits)
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return root


def tiny_archive(path: Path, tag: str, padding: int = 0) -> Path:
    """A ``.tar.gz`` submission whose files are unique to ``tag`` (``padding`` random-looking bytes extra)."""
    files = {"recipe.yaml": yaml.safe_dump(RECIPE).encode(), "base/config.json": b"{}", "e1/config.json": b"{}",
             "note.txt": f"submission {tag}\n".encode()}
    if padding:
        seed = hashlib.sha256(tag.encode()).digest()
        files["pad.bin"] = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
                                    for i in range(padding // 32 + 1))[:padding]
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Server:
    """``mergelab judge serve HOME`` on 127.0.0.1 in a child process (a context manager)."""

    def __init__(self, home: Path, log: Path, *, start_timeout: float = 90.0):
        self.home, self.log_path, self.port = home, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mergelab.cli", "judge", "serve", str(self.home),
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"judge serve exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx2.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("judge serve did not answer in time")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stub_judge_one(spec: dict) -> dict:
    """A judged run's result without running anything: random (by id) but valid predictions."""
    home = Path(spec["home"])
    preds: dict[str, dict[str, str]] = {}
    for task in spec["tasks"]:
        preds[task] = {}
        for row in read_competition_csv(home / "inputs" / f"{task}.csv"):
            h = int(hashlib.sha256(f"{spec['id']}/{task}/{row.id}".encode()).hexdigest()[:8], 16)
            preds[task][row.id] = str(h % len(row.choices)) if row.choices else " ".join(str(j) for j in range(h % 4))
    return {"id": spec["id"], "status": "ok", "detail": None, "predictions": preds, "fingerprint": None,
            "manifest": {"stub": True}, "worker_s": 0.0,
            "outcome": {"wall_s": 0.01, "peak_mem_mb": 1.0, "log_tail": f"stub run of {spec['id'][:12]}\n",
                        "isolation": {"stub": True}}}


def stub_round(home: Path):
    """One ``judge round`` with :func:`stub_judge_one` as the judged run."""
    real = rounds.judge_one
    rounds.judge_one = stub_judge_one
    try:
        return rounds.run_round(home)
    finally:
        rounds.judge_one = real


def round_loop(home: str, stop_file: str) -> None:
    """Stub rounds and leaderboard reads, one after the other, until ``stop_file`` exists (a child process)."""
    n = judged = 0
    stub_round(Path(home))                       # imports done: say so
    Path(stop_file + ".ready").touch()
    while not os.path.exists(stop_file):
        report = stub_round(Path(home))
        judged += len(report.judged)
        leaderboard.build(home)
        n += 1
        time.sleep(0.02)
    print(json.dumps({"rounds": n, "judged": judged}))


def start_round_loop(home: Path, stop_file: Path, timeout: float = 90.0) -> subprocess.Popen:
    """:func:`round_loop` in a child process, returned once it runs (touch ``stop_file`` to end it)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from mergelab.testing.judge_service import "
                             "round_loop; round_loop(sys.argv[1], sys.argv[2])", str(home), str(stop_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    ready = Path(str(stop_file) + ".ready")
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the round loop did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    return proc


def check_store(home: Path) -> dict:
    """Every submission in the database once, its store folder complete (content hash = its name),
    nothing else in the store, no upload or staging leftovers."""
    conn = connect(home / "secret" / "judge.sqlite")
    try:
        rows = conn.execute("SELECT id, content, status FROM submissions").fetchall()
    finally:
        conn.close()
    store = home / "store"
    folders = {p.name for p in store.iterdir() if not p.name.startswith(".")}
    bad = [r["content"] for r in rows if r["content"] in folders and content_hash(store / r["content"]) != r["content"]]
    leftovers = [p.name for p in store.iterdir() if p.name.startswith(".") and p.name != ".uploads"]
    leftovers += [f".uploads/{p.name}" for p in (store / ".uploads").iterdir()] if (store / ".uploads").is_dir() else []
    return {"rows": len(rows), "ids": len({r["id"] for r in rows}), "folders": folders,
            "contents": {r["content"] for r in rows}, "half_written": bad, "leftovers": leftovers}
