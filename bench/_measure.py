"""Process measurements shared by the benchmarks: child runs, peak RSS, CPU time, wall time, load.

* :func:`measure_command` runs a command in a child process and returns its wall time, CPU time
  and peak RSS: the child's ``ru_maxrss`` from ``wait4`` (its kernel high-water mark, the
  ``VmHWM`` of ``/proc/PID/status``), cross-checked by polling its process tree with psutil;
* :func:`child_result` / :func:`print_result`: a benchmark that re-runs itself in a fresh
  process (``--child``) hands its figures back on one ``RESULT {json}`` line of stdout;
* :func:`peak_rss_mb` and :func:`cpu_seconds` of this process, for figures a child takes itself;
* :func:`timed`: wall time of a block, with an optional ``sync`` (e.g. ``torch.cuda.synchronize``)
  before the start and before the end;
* :func:`load_average`: the machine's load, printed with every figure (other work on the same
  cores slows every run);
* :func:`open_zoo`: the demo zoo the quality benchmarks measure, or another built one (``--zoo``).

Imports nothing heavy (no torch): a driver that only spawns children stays light.
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

RESULT = "RESULT "


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (NaN where the platform has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan, math.nan, math.nan)


def load_text() -> str:
    """The load averages as ``1.0/0.8/0.5`` (``?`` where the platform has none)."""
    load = load_average()
    return "?" if math.isnan(load[0]) else "/".join(f"{x:.1f}" for x in load)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads): with the cores shared, wall time is not the work."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class Elapsed:
    """What :func:`timed` measured: ``seconds`` once the block has ended."""

    seconds: float = 0.0


@contextmanager
def timed(sync: Callable[[], None] | None = None) -> Iterator[Elapsed]:
    """Wall time of the ``with`` block; ``sync()`` runs before the clock starts and before it stops."""
    sync = sync or (lambda: None)
    out = Elapsed()
    sync()
    t0 = time.perf_counter()
    yield out
    sync()
    out.seconds = time.perf_counter() - t0


def measure_command(cmd: list[str], env: dict | None = None, *, rss_cap: int | None = None,
                    check: bool = True) -> dict:
    """Run ``cmd``; wall time, and its peak RSS (wait4) and the polled peak of its process tree.

    Returns ``wall_s``, ``cpu_s`` (user + system of the child), ``peak_rss`` (bytes), ``stdout``
    and ``returncode``. With ``rss_cap`` (bytes) the child's tree is killed when it grows past
    it (``capped: True``), so a peer that would exhaust the machine's memory is stopped first. A
    failing command prints the end of its stderr and ends this process, unless ``check=False``
    (then ``error`` holds that end).
    """
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    polled = [0]
    capped = [False]
    stop = threading.Event()

    def poll():
        try:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                    polled[0] = max(polled[0], rss)
                    if rss_cap is not None and rss > rss_cap:
                        capped[0] = True
                        for c in p.children(recursive=True) + [p]:
                            c.kill()
                except psutil.Error:
                    pass
                stop.wait(0.02)
        except psutil.Error:
            pass

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda s=s, c=c: c.append(s.read())) for s, c in
               ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = err_chunks[0].decode(errors="replace")[-3000:]
    if proc.returncode != 0 and check and not capped[0]:
        sys.stderr.write(err)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    out = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "returncode": proc.returncode,
           "peak_rss": max(usage.ru_maxrss * 1024, polled[0]), "stdout": out_chunks[0].decode(errors="replace")}
    if capped[0]:
        out["capped"] = True
    if proc.returncode != 0:
        out["error"] = err
    return out


def print_result(result: dict) -> None:
    """The child's side of :func:`child_result`: its figures on one line of stdout."""
    print(RESULT + json.dumps(result))


def child_result(cmd: list[str], name: str) -> dict:
    """Run ``cmd`` (a benchmark's ``--child`` run) and return the figures of its ``RESULT`` line."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len(RESULT):])


def compare_checkpoints(a, b, block: int = 1 << 25) -> dict:
    """How close two merged checkpoints are: the share of entries within bf16 rounding of ``b``'s
    (``isclose`` with rtol 1/64, atol 1e-4) and the relative L2 difference, read block by block so
    that 8B-shaped outputs fit. Imports torch and mergelab when called."""
    import torch

    from mergelab.io.checkpoint import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.keys()) == sorted(rb.keys()), "different tensor names"
    close = n = 0
    num = den = 0.0
    for k in ra.keys():
        shape = ra.shape(k)
        rows = shape[0] if shape else 1
        step = max(1, block // max(math.prod(shape[1:]), 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x, y = ra.get_rows(k, r0, r1).float(), rb.get_rows(k, r0, r1).float()
            close += int(torch.isclose(x, y, rtol=1 / 64, atol=1e-4).sum())
            n += x.numel()
            num += float((x - y).double().pow(2).sum())
            den += float(y.double().pow(2).sum())
    return {"close": close / max(n, 1), "rel_l2": (num / den) ** 0.5 if den else 0.0}


def read_once(files) -> int:
    """Read every byte of ``files`` once into one reused 64 MiB buffer (the floor for any tool that
    reads them; also warms the page cache). Returns the bytes read."""
    view = memoryview(bytearray(64 << 20))
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def open_zoo(zoo_dir, device: str, console):
    """``zoo_dir`` as built (``mergelab zoo build DIR [--seed-per-task]``) when it holds a
    ``zoo.json``; else the zoo in that folder or the demo's default one, built from the adapters
    shipped with mergelab (nothing trained when they match)."""
    from pathlib import Path

    from mergelab.zoo.build import build_zoo, default_zoo_dir, load_zoo

    root = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir()
    if zoo_dir is not None and (root / "zoo.json").is_file():
        return load_zoo(root)
    return build_zoo(root, use_packaged=True, evaluate=False, device=device, console=console)
