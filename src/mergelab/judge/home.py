"""The competition home: its ``competition.yaml``, its folder layout, and the public/private split."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergelab.errors import MergelabError
from mergelab.evaluate import read_competition_csv
from mergelab.judge.db import connect
from mergelab.plan import calibrate, calibrated_profile, get_profile, parse_budget
from mergelab.hub.rules import DEFAULT_MAX_PARAMS, OPEN_LICENCES, OPEN_WEIGHT_LICENCES

CONFIG_NAME = "competition.yaml"
INPUT_COLUMNS = ("id", "input", "answer_choices", "eval_type")


class JudgeError(MergelabError):
    """The competition home is missing or malformed, or a judge command cannot proceed."""


@dataclass
class Competition:
    """The settings of a season, as ``competition.yaml`` holds them."""

    cutoff: str = "2024-05-31"
    max_params: int = DEFAULT_MAX_PARAMS
    licences: list[str] = field(default_factory=lambda: sorted(OPEN_LICENCES | OPEN_WEIGHT_LICENCES))
    budget: str = "60m"                 # merging + fine-tuning + evaluation, on the reference card
    reference_hardware: str = "a6000"
    judge_hardware: str = "a6000"        # the profile of the judge's own machine (or "<name>+calibrated")
    speed_factor: float = 1.0            # judge throughput / reference throughput (< 1: a slower judge)
    memory_limit_gb: float = 64.0        # private-memory cap of a judged run (RLIMIT_DATA)
    submissions_per_round: int | None = None   # per team; None = unlimited
    public_fraction: float = 0.3
    tasks: list[str] = field(default_factory=list)
    archive_max_bytes: int = 2 << 30     # unpacked size cap of a submission
    archive_max_files: int = 1000
    archive_max_ratio: float = 200.0     # unpacked / packed size cap (zip-bomb guard)
    # the service (`judge serve`): limits per team token
    upload_max_bytes: int = 1 << 30      # packed size of one uploaded archive (413 above it)
    submissions_per_day: int | None = 5  # per team and UTC day, rejected ones included (429); None = unlimited
    requests_per_minute: int = 60        # per token, any API request or team page (429)
    team_log_tail: bool = True           # teams see the tail of their own judged run's log

    @property
    def time_limit_s(self) -> float:
        """The hard wall-clock limit of one judged run here: the budget scaled by the judge's speed."""
        return parse_budget(self.budget) / self.speed_factor


@dataclass(frozen=True)
class Home:
    """The paths of a competition home."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def secret(self) -> Path:
        return self.root / "secret"

    @property
    def targets(self) -> Path:
        return self.secret / "targets"

    @property
    def database(self) -> Path:
        return self.secret / "judge.sqlite"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def hub_cache(self) -> Path:
        return self.root / "hub-cache"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    def load(self) -> Competition:
        if not self.config.is_file():
            raise JudgeError(f"{self.root} is not a competition home (no {CONFIG_NAME})",
                             hint="create one with `mergelab judge init DIR --tasks hidden/*.csv`")
        data = yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}
        try:
            return Competition(**data)
        except TypeError as exc:
            raise JudgeError(f"{self.config}: {exc}") from None

    def task_names(self) -> list[str]:
        return self.load().tasks


def is_public(task: str, row_id: str, fraction: float) -> bool:
    """Whether a hidden row is in the public part: the first 8 hex digits of
    sha256("TASK/ROW_ID"), as a number in [0, 1), below ``fraction``."""
    h = int(hashlib.sha256(f"{task}/{row_id}".encode()).hexdigest()[:8], 16)
    return h / 16 ** 8 < fraction


def speed_of(profile_name: str) -> float:
    """Achievable matmul throughput of a hardware profile (FLOP/s)."""
    return get_profile(profile_name).flops


def init_home(root: str | Path, tasks: list[str | Path], *, cutoff: str = "2024-05-31",
              max_params: int = DEFAULT_MAX_PARAMS, licences: list[str] | None = None, budget: str = "60m",
              hardware: str = "a6000", calibrate_here: bool = False, speed_factor: float | None = None,
              memory_limit_gb: float = 64.0, submissions_per_round: int | None = None,
              public_fraction: float = 0.3) -> Home:
    """Create a competition home from the hidden task CSV files (targets included)."""
    home = Home(Path(root))
    if home.config.exists():
        raise JudgeError(f"{home.root} is already a competition home", hint="choose another folder")
    if not tasks:
        raise JudgeError("no hidden task files given", hint="pass --tasks hidden/*.csv")
    if not 0.0 <= public_fraction <= 1.0:
        raise JudgeError(f"public fraction {public_fraction} is not between 0 and 1")
    parse_budget(budget)
    names = []
    rows_of = {}
    for t in tasks:
        path = Path(t)
        rows = read_competition_csv(path)
        if any(r.target is None for r in rows):
            raise JudgeError(f"{path}: a hidden task needs a target in every row "
                             f"(row {next(r.id for r in rows if r.target is None)} has none)")
        if path.stem in rows_of:
            raise JudgeError(f"two task files are named {path.stem}")
        rows_of[path.stem] = (path, rows)
        names.append(path.stem)
    if speed_factor is None:
        reference = get_profile("a6000").flops
        if calibrate_here:
            profile = calibrated_profile(get_profile(hardware), calibrate())
            speed_factor, hardware = profile.flops / reference, profile.name
        else:
            speed_factor = speed_of(hardware) / reference
    comp = Competition(cutoff=cutoff, max_params=int(max_params), budget=budget, judge_hardware=hardware,
                       speed_factor=float(speed_factor), memory_limit_gb=memory_limit_gb,
                       submissions_per_round=submissions_per_round, public_fraction=public_fraction,
                       tasks=names, **({"licences": sorted(licences)} if licences else {}))
    for d in (home.inputs, home.targets, home.store, home.hub_cache, home.scratch):
        d.mkdir(parents=True, exist_ok=True)
    home.secret.chmod(0o700)
    for name, (path, rows) in rows_of.items():
        shutil.copyfile(path, home.targets / f"{name}.csv")
        with open(home.inputs / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(INPUT_COLUMNS)
            for r in rows:
                w.writerow([r.id, r.input, _choices_text(r.choices), r.eval_type])
    connect(home.database).close()
    home.config.write_text(yaml.safe_dump(asdict(comp), sort_keys=False), encoding="utf-8")
    return home


def _choices_text(choices: list[str] | None) -> str:
    return json.dumps(choices) if choices is not None else ""


def read_targets(home: Home, task: str) -> list[Any]:
    """The hidden rows of ``task`` with their targets (the judge's side only)."""
    return read_competition_csv(home.targets / f"{task}.csv")
