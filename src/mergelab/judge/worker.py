"""One judged run, as a function of plain data (so that a Ray task can run it as it is).

:func:`judge_one` copies the stored submission into the run's own scratch folder, writes the
judged recipe (the submission's, reading the hidden inputs), runs ``mergelab run`` under the
limits of :mod:`.sandbox`, reads the predictions (never the targets), fingerprints the merged
model, removes the large outputs, and returns a JSON-able result. Scoring is the judge's job
(:mod:`.rounds`), where the targets are.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import mergelab
from mergelab.judge.fingerprint import task_vector_sketch
from mergelab.judge.home import Home
from mergelab.judge.intake import JUDGED_RECIPE, RECIPE_NAME, judged_recipe
from mergelab.judge.sandbox import run_limited
from mergelab.judge.scoring import GarbageOutput, read_predictions

#: Variables a judged run inherits from the judge (nothing else: no tokens, no proxies).
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS", "VIRTUAL_ENV")
BIG_OUTPUTS = ("model", "merged", "finetune")


def run_env(home: Home, scratch: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    # the judged run uses this judge's mergelab (first on the path), whatever its folder
    own = str(Path(mergelab.__file__).resolve().parent.parent)
    paths = [own] + [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for d in ("home", "tmp", "hf"):
        (scratch / d).mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(scratch / "home"), TMPDIR=str(scratch / "tmp"), HF_HOME=str(scratch / "hf"),
               HF_HUB_CACHE=str(home.hub_cache), HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONDONTWRITEBYTECODE="1")
    return env


def _last_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def judge_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one submission. ``spec``: home, id, content, tasks, time_limit_s, memory_bytes, device."""
    t0 = time.monotonic()
    home = Home(Path(spec["home"]))
    sid = spec["id"]
    scratch = home.scratch / sid
    if scratch.exists():                       # a leftover of an interrupted attempt
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    sub = scratch / "submission"
    shutil.copytree(home.store / spec["content"], sub)
    recipe = yaml.safe_load((sub / RECIPE_NAME).read_text(encoding="utf-8"))
    inputs = [home.inputs / f"{t}.csv" for t in spec["tasks"]]
    (sub / JUDGED_RECIPE).write_text(yaml.safe_dump(judged_recipe(recipe, inputs), sort_keys=False))
    run_dir = scratch / "run"
    cmd = [sys.executable, "-m", "mergelab", "run", str(sub / JUDGED_RECIPE), "--out", str(run_dir),
           "--no-rules", "--quiet", "--device", spec.get("device", "auto")]
    outcome = run_limited(cmd, scratch=scratch, time_limit_s=spec["time_limit_s"],
                          memory_bytes=spec.get("memory_bytes"), env=run_env(home, scratch),
                          hide=(home.store,), secret=home.secret, scratch_root=home.scratch)
    result: dict[str, Any] = {"id": sid, "outcome": outcome.to_dict(), "predictions": None,
                              "fingerprint": None, "manifest": None, "detail": ""}
    manifest_path = run_dir / "manifest.json"
    if manifest_path.is_file():
        try:
            result["manifest"] = json.loads(manifest_path.read_text())
        except ValueError:
            result["manifest"] = None
    if outcome.timed_out:
        result["status"] = "over_time"
        result["detail"] = f"killed at the limit of {spec['time_limit_s']:.0f} s"
    elif outcome.returncode != 0:
        result["status"] = "failed"
        result["detail"] = f"exit status {outcome.returncode}: {_last_error(outcome.log_tail)}"
    else:
        try:
            result["predictions"] = read_predictions(run_dir / "eval", home.inputs, spec["tasks"])
            result["status"] = "ok"
        except (GarbageOutput, Exception) as exc:   # noqa: BLE001 - any unreadable output is garbage
            result["status"] = "failed"
            result["detail"] = f"garbage output: {exc}"
    if result["status"] == "ok" and result["manifest"]:
        try:
            base = next(m["local_path"] for m in result["manifest"]["models"] if m["role"] == "base")
            if (run_dir / "model" / "config.json").is_file():
                result["fingerprint"] = task_vector_sketch(run_dir / "model", base)
        except Exception as exc:  # noqa: BLE001 - a fingerprint is evidence, never a reason to fail
            result["detail"] = f"no fingerprint ({type(exc).__name__}: {exc})"
    for name in BIG_OUTPUTS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    shutil.rmtree(scratch / "tmp", ignore_errors=True)
    result["worker_s"] = time.monotonic() - t0
    return result
