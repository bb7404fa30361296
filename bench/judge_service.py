"""The judge service under load, on the loopback only: N submissions (tiny archives) from C concurrent
clients through ``mergelab judge serve`` (uvicorn, one process) while ``judge round`` (its judged
run stubbed: no model runs, the round's database work is real) loops in another process on the same
SQLite database. Prints the intake latency (p50/p99, as the clients see it: upload + intake +
receipt) and checks that every accepted submission is stored exactly once, complete.

    python bench/judge_service.py [--submissions 200] [--clients 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import httpx2  # noqa: E402

from mergelab.judge.client import upload  # noqa: E402
from mergelab.judge.teams import add_team  # noqa: E402
from mergelab.testing.judge_service import Server, check_store, make_home, start_round_loop, tiny_archive  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--submissions", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    args = ap.parse_args()
    n, c = args.submissions, args.clients
    with tempfile.TemporaryDirectory(prefix="judge-service-bench-") as tmp:
        tmp = Path(tmp)
        per_team = -(-n // c)
        home = make_home(tmp / "home", submissions_per_day=per_team, requests_per_minute=max(60, 2 * per_team))
        teams = [f"team{i:02d}" for i in range(c)]
        tokens = {t: add_team(home, t) for t in teams}
        work = [(teams[i % c], tiny_archive(tmp / f"s{i}.tar.gz", f"s{i}")) for i in range(n)]
        lat: list[float] = []
        answers = []
        lock = threading.Lock()
        with Server(home, tmp / "serve.log") as server:
            stop = tmp / "stop"
            loop = start_round_loop(home, stop)

            def client(team: str) -> None:
                with httpx2.Client(timeout=120) as http:
                    for t, path in work:
                        if t == team:
                            t0 = time.perf_counter()
                            a = upload(server.url, tokens[team], path, client=http)
                            with lock:
                                lat.append(time.perf_counter() - t0)
                                answers.append(a)

            t0 = time.perf_counter()
            try:
                with ThreadPoolExecutor(c) as pool:
                    list(pool.map(client, teams))
            finally:
                wall = time.perf_counter() - t0
                stop.touch()
                out, err = loop.communicate(timeout=300)
            rounds = json.loads(out) if loop.returncode == 0 else {"error": err[-500:]}
        accepted = [a for a in answers if a.status == 201]
        store = check_store(home)
        q = statistics.quantiles(lat, n=100)
        print(f"judge service: {n} submissions from {c} concurrent clients on 127.0.0.1, "
              f"stub rounds beside it: {rounds}")
        print(f"  accepted {len(accepted)}/{n} (other answers: {sorted({a.status for a in answers} - {201})}); "
              f"wall {wall:.1f} s, {n / wall:.1f} submissions/s")
        print(f"  intake latency: p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms")
        ids = {a.body["id"] for a in accepted}
        ok = (len(accepted) == n and len(ids) == n and store["rows"] == n and store["ids"] == n
              and {a.body["content"] for a in accepted} <= store["folders"] and not store["half_written"]
              and not store["leftovers"] and len(store["folders"]) == n)
        print(f"  stored: {store['rows']} rows, {len(store['folders'])} store folders, "
              f"half-written {len(store['half_written'])}, leftovers {len(store['leftovers'])} -> "
              + ("every accepted submission stored exactly once" if ok else "MISMATCH"))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
