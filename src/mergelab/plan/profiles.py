"""Hardware profiles: the speeds and sizes of a device, from ``mergelab/data/hardware.yaml``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mergelab.errors import MergelabError

HARDWARE_FILE = Path(__file__).resolve().parents[1] / "data" / "hardware.yaml"


class HardwareError(MergelabError):
    """An unknown hardware profile, or a broken hardware data file."""


@dataclass(frozen=True)
class Profile:
    """Speeds and sizes of one device. Units: bytes, bytes/s, FLOP/s, seconds."""

    name: str
    label: str
    kind: str                      # "cuda" or "cpu"
    memory: float
    memory_bandwidth: float
    bf16_flops: float
    disk_read: float
    host_to_device: float
    matmul_efficiency: float
    bandwidth_efficiency: float
    layer_overhead: float          # seconds per decoder layer per forward call
    tensor_overhead: float         # seconds per tensor in the merge engine
    load_overhead: float           # seconds of fixed cost per model load
    sources: dict = field(default_factory=dict)

    @property
    def flops(self) -> float:
        """Achievable matmul throughput (FLOP/s)."""
        return self.bf16_flops * self.matmul_efficiency

    @property
    def bandwidth(self) -> float:
        """Achievable memory bandwidth (bytes/s)."""
        return self.memory_bandwidth * self.bandwidth_efficiency

    @property
    def weight_bytes(self) -> int:
        """Bytes per parameter when a model runs here: bf16 on a GPU, float32 on a CPU."""
        return 2 if self.kind == "cuda" else 4


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, Profile]:
    """The hardware profiles of ``mergelab/data/hardware.yaml`` (or ``path``), by name."""
    path = Path(path) if path is not None else HARDWARE_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise HardwareError(f"{path}: cannot read the hardware profiles ({exc})") from None
    out = {}
    for name, entry in raw.items():
        try:
            fields = {k: (float(v) if k not in ("label", "kind", "sources") else v) for k, v in entry.items()}
            out[name] = Profile(name=name, **fields)
        except (TypeError, ValueError) as exc:
            raise HardwareError(f"{path}: profile {name!r} is malformed ({exc})") from None
        missing = [k for k in Profile.__dataclass_fields__ if k not in ("name", "label", "kind", "sources")
                   and k not in (out[name].sources or {}) and k != "host_to_device"]
        if missing:
            raise HardwareError(f"{path}: profile {name!r} gives no source for {', '.join(missing)}")
    return out


def get_profile(name: str) -> Profile:
    profiles = load_profiles()
    key = name.strip().lower()
    if key not in profiles:
        raise HardwareError(f"unknown hardware profile {name!r}; known: {', '.join(profiles)}",
                            hint="pass --hardware a6000 (the competition's card), a100, h100, l4 or cpu")
    return profiles[key]
