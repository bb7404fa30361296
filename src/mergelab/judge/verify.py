"""``judge verify``: run a scored submission again (``mergelab reproduce`` under the same limits
and isolation as the judged run) and report every output whose bytes differ."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.judge.db import connect
from mergelab.judge.home import Competition, Home, JudgeError
from mergelab.judge.sandbox import run_limited
from mergelab.judge.worker import BIG_OUTPUTS, run_env

_MARKS = ("differs:", "missing output:", "new output:", "input changed:")


@dataclass
class VerifyReport:
    submission: str
    reproduced: bool
    differences: list[str] = field(default_factory=list)
    status: str = ""            # ok | differs | failed | over_time
    log_tail: str = ""


def find_submission(conn, prefix: str):
    rows = conn.execute("SELECT s.id, s.team, x.status, x.manifest FROM submissions s LEFT JOIN results x "
                        "ON x.submission = s.id WHERE s.id LIKE ?", (prefix + "%",)).fetchall()
    if len(rows) != 1:
        raise JudgeError(f"{'no' if not rows else len(rows)} submission(s) whose id starts with {prefix!r}",
                         hint="give more characters of the id from the receipt")
    return rows[0]


def verify(root: str | Path, submission: str, *, device: str = "auto") -> VerifyReport:
    home = Home(Path(root))
    comp: Competition = home.load()
    conn = connect(home.database)
    try:
        row = find_submission(conn, submission)
    finally:
        conn.close()
    if row["status"] != "scored" or not row["manifest"]:
        raise JudgeError(f"submission {row['id'][:12]} is {row['status'] or 'not judged'}: only a scored "
                         "submission can be verified")
    scratch = home.scratch / row["id"]
    if not (scratch / "submission").is_dir():
        raise JudgeError(f"{scratch / 'submission'} is gone: the submission's run folder is needed to verify it")
    work = scratch / "verify"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (work / "manifest.json").write_text(json.dumps(json.loads(row["manifest"])))
    cmd = [sys.executable, "-m", "mergelab", "reproduce", str(work / "manifest.json"), "--out", str(work / "run"),
           "--quiet", "--device", device]
    outcome = run_limited(cmd, scratch=scratch, time_limit_s=comp.time_limit_s,
                          memory_bytes=int(comp.memory_limit_gb * (1 << 30)), env=run_env(home, scratch),
                          hide=(home.store,), secret=home.secret, scratch_root=home.scratch, log_name="verify-log.txt")
    for name in BIG_OUTPUTS:
        shutil.rmtree(work / "run" / name, ignore_errors=True)
    log = (scratch / "verify-log.txt").read_text(errors="replace")
    diffs = [ln.strip() for ln in log.splitlines() if ln.strip().startswith(_MARKS)]
    if outcome.timed_out:
        status = "over_time"
    elif outcome.returncode == 0:
        status = "ok"
    elif outcome.returncode == 1 and diffs:
        status = "differs"
    else:
        status = "failed"
    return VerifyReport(row["id"], status == "ok", diffs, status, outcome.log_tail)
