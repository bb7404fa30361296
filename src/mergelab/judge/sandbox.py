"""Run one command under the judge's limits: wall clock, memory, no network, hidden folders.

* **wall clock**: the command runs in its own process group, killed (SIGKILL) at the limit;
* **memory**: ``RLIMIT_DATA`` (private writable memory: heap and anonymous mappings) is set in
  the child before it starts; unlike ``RLIMIT_AS`` it leaves alone the large address-space
  reservations a CUDA driver makes (which an address-space cap breaks). The peak resident memory
  is read from ``wait4``;
* **no network**: ``HF_HUB_OFFLINE=1`` always; where the OS allows it (``unshare -rnm`` works:
  user, network and mount namespaces), the command also runs in a fresh network namespace (only
  a loopback that is down: not even 127.0.0.1 of the host is reachable);
* **hidden folders**: in that mount namespace, the judge's secrets (targets, database), the
  submission store and the other runs' scratch folders are covered by empty tmpfs mounts; only
  the command's own scratch folder stays visible under the scratch root;
* a child that outlives the judge is killed by the kernel (``PR_SET_PDEATHSIG``).

Where namespaces are not available, the command runs without them and :class:`Outcome` says so
(``isolation``), so that a result always records how it was obtained.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

LOG_TAIL = 4000

# Run inside the new namespaces: cover the hidden folders, keep the run's own scratch folder.
_COVER = r"""
set -e
secret="$1"; scratch_root="$2"; own="$3"; n="$4"; shift 4
mount -t tmpfs -o size=1m,mode=700 judge-hidden "$secret"
mkdir -p "$secret/own"
mount --bind "$own" "$secret/own"
mount -t tmpfs -o mode=755 judge-scratch "$scratch_root"
mkdir -p "$own"
mount --bind "$secret/own" "$own"
i=0
while [ "$i" -lt "$n" ]; do
  mount -t tmpfs -o size=1m,mode=700 judge-hidden "$1"
  shift; i=$((i + 1))
done
exec "$@"
"""


@dataclass
class Outcome:
    """What happened to one command."""

    returncode: int | None
    wall_s: float
    peak_mem_mb: float
    timed_out: bool
    log_tail: str
    isolation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether ``unshare -rnm`` with tmpfs and bind mounts works here (tried once)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    try:
        r = subprocess.run(["unshare", "-rnm", "sh", "-c", "mount -t tmpfs t /mnt && mount --bind /mnt /mnt"],
                           capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


# The judged command's first process: sets the memory cap and the parent-death signal, then
# becomes the command (exec). Done in a fresh interpreter rather than in a ``preexec_fn``, which is
# unsafe in a judge that has threads (Ray, the Hub imitation of the tests).
_BOOT = """import ctypes, os, resource, signal, sys
m = int(sys.argv[1])
if m:
    resource.setrlimit(resource.RLIMIT_DATA, (m, m))
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[2]):              # the judge died before the line above
    os._exit(137)
os.execvp(sys.argv[3], sys.argv[3:])
"""


def run_limited(cmd: list[str], *, scratch: Path, time_limit_s: float, memory_bytes: int | None,
                env: dict[str, str], hide: tuple[Path, ...] = (), secret: Path | None = None,
                scratch_root: Path | None = None, log_name: str = "log.txt",
                isolate: bool = True) -> Outcome:
    """Run ``cmd`` in ``scratch`` under the limits (see the module doc); never raises for what the
    command does (a crash, a kill, a timeout are outcomes)."""
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    log_path = scratch / log_name
    env = dict(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    isolation = {"network": "HF_HUB_OFFLINE=1 only", "filesystem": "not hidden (no mount namespace)",
                 "memory_limit_bytes": memory_bytes, "time_limit_s": time_limit_s}
    # the boot (memory cap, parent-death signal) runs last before the command: entering a user
    # namespace changes the credentials, which clears a parent-death signal set before it
    boot = [sys.executable, "-c", _BOOT, str(memory_bytes or 0), str(os.getpid())]
    full = boot + list(cmd)
    if isolate and namespaces_available() and secret is not None and scratch_root is not None:
        full = ["unshare", "-rnm", "sh", "-c", _COVER, "judge-cover", str(secret), str(scratch_root),
                str(scratch), str(len(hide)), *[str(h) for h in hide], *boot, *cmd]
        isolation["network"] = "fresh network namespace (unshare -rn) + HF_HUB_OFFLINE=1"
        isolation["filesystem"] = ("hidden: " + ", ".join(str(p) for p in (secret, *hide))
                                   + "; other scratch folders")
    elif isolate:
        isolation["note"] = "unshare -rnm is not available here: network and folders are not isolated"
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.Popen(full, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.write(f"cannot start: {exc}\n".encode())
            return Outcome(None, 0.0, 0.0, False, _tail(log_path), isolation)
        deadline = t0 + time_limit_s
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _hwm_bytes(proc.pid))
            if time.monotonic() >= deadline:
                timed_out = True
                _kill_group(proc.pid)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        _kill_group(proc.pid)          # leftovers of the group (none, normally)
    wall = time.monotonic() - t0
    # VmHWM is the peak of the command's own program (it starts afresh at exec); wait4's ru_maxrss
    # also counts the copy of the judge made by fork before the exec, so it is only the fallback
    # for a command too short to be seen by the 50 ms polls
    peak_mb = peak / 2**20 if peak else usage.ru_maxrss / 1024.0
    return Outcome(proc.returncode, wall, peak_mb, timed_out, _tail(log_path), isolation)


def _hwm_bytes(pid: int) -> int:
    """The peak resident memory (VmHWM) of ``pid``'s current program, 0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    data = path.read_bytes()
    return data[-n:].decode("utf-8", "replace")
