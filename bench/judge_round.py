#!/usr/bin/env python
"""The organizer's judge: a round of the eight-submission demo season (``mergelab.testing.judge_season``)
on this machine and as Ray tasks, and what the judge costs beyond the judged runs themselves.

Figures printed (and written to ``--out``, JSON):

* intake: seconds per ``judge submit`` (unpack, recipe check, rule check against a local Hub
  imitation, snapshot fetch, store, record);
* judge overhead per judged submission beyond the run itself: the time from the start of the
  judged run's preparation to its recorded result, minus the judged child process's wall time
  (copying the submission, the judged recipe, reading and checking the predictions, the
  fingerprint, clean-up, scoring and the SQLite transaction);
* round wall time, local (one judged run after another) vs Ray (``ray.init(num_cpus=N)``, one
  task per submission), with the sum of the judged runs' own wall times beside each.

    python bench/judge_round.py                 # ~3 min on a 2-core CPU
    python bench/judge_round.py --budget 20 --ray-cpus 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_SRC = str(Path(__file__).resolve().parent.parent / "src")
sys.path.insert(0, _SRC)
# Ray workers import mergelab by name: this checkout's, like the driver
os.environ["PYTHONPATH"] = os.pathsep.join([_SRC, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

from mergelab.testing.hubsim import HubSim
from mergelab.testing.judge_season import build_season  # noqa: E402
from mergelab.judge.home import init_home  # noqa: E402
from mergelab.judge.intake import submit  # noqa: E402
from mergelab.judge.rounds import run_round  # noqa: E402


def home_for(season, home: Path, budget: float) -> list[float]:
    init_home(home, season.tasks, budget=f"{budget:g}s", speed_factor=1.0, memory_limit_gb=8)
    times = []
    with HubSim(season.repos) as hub, hub.environ(cache_dir=home.parent / f"{home.name}-cache"):
        for team, path in season.for_home(home):
            t = time.perf_counter()
            submit(home, path, team)
            times.append(time.perf_counter() - t)
    return times


def summary(report) -> dict:
    runs = [j for j in report.judged if j.get("overhead_s") is not None]
    return {"round_wall_s": round(report.wall_s, 2), "judged": len(report.judged),
            "sum_run_wall_s": round(sum(j["wall_s"] for j in runs), 2),
            "overhead_s_mean": round(statistics.mean(j["overhead_s"] for j in runs), 3),
            "overhead_s_max": round(max(j["overhead_s"] for j in runs), 3),
            "statuses": {j["team"]: j["status"] for j in report.judged}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=30.0, help="time limit of a judged run (s)")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    figures: dict = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(prefix="mergelab-bench-judge-") as tmp:
        root = Path(tmp)
        season = build_season(root, home=root / "local")
        intake = home_for(season, root / "local", args.budget)
        figures["intake_s_per_submission"] = {"mean": round(statistics.mean(intake), 3),
                                              "max": round(max(intake), 3), "n": len(intake)}
        figures["local"] = summary(run_round(root / "local", device="cpu"))
        print(json.dumps({"local": figures["local"]}), flush=True)
        try:
            import ray
        except ImportError:
            ray = None
            figures["ray"] = "not installed (pip install 'mergelab[cluster]')"
        if ray is not None and not args.no_ray:
            home_for(season, root / "ray", args.budget)
            t = time.perf_counter()
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
            figures["ray_start_s"] = round(time.perf_counter() - t, 2)
            figures["ray"] = summary(run_round(root / "ray", backend="ray", device="cpu"))
            ray.shutdown()
            figures["ray_vs_local_wall"] = round(figures["ray"]["round_wall_s"] / figures["local"]["round_wall_s"], 3)
    figures["machine"]["load_after"] = os.getloadavg()[0]
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
