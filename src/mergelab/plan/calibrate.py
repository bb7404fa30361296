"""Calibration: the matmul throughput, memory bandwidth and forward-call overheads measured on this device."""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from mergelab.evaluate.loading import load_model_and_tokenizer
from mergelab.plan.profiles import Profile
from mergelab.plan.sizes import ModelInfo, inspect_model


def calibrate(device: str = "auto", base_dir: str | os.PathLike | None = None,
              max_forward_params: int = 200_000_000) -> dict:
    """Measure this device: a matmul (FLOP/s), a memory copy (bytes/s), a model's forward call.

    The forward probe loads ``base_dir`` when it has at most ``max_forward_params`` parameters and
    times short forward calls; the time a call takes beyond its FLOPs, per decoder layer, is the
    measured ``layer_overhead``, and the load time (minus reading the bytes) the ``load_overhead``.
    """
    import torch

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def best_of(fn, reps: int) -> float:
        times = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    n = 4096 if dev.type == "cuda" else 384
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=None)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    inner = 10 if dev.type == "cuda" else 3
    t = best_of(lambda: [a @ b for _ in range(inner)], 3)
    flops = 2.0 * n ** 3 * inner / t
    size = (256 << 20) if dev.type == "cuda" else (16 << 20)
    src = torch.empty(size // 4, device=dev, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = best_of(lambda: dst.copy_(src), 5)
    bandwidth = 2.0 * size / t          # a copy reads and writes every byte
    if dev.type == "cuda":
        memory = torch.cuda.get_device_properties(dev).total_memory
    else:
        import psutil

        memory = psutil.virtual_memory().total
    probe = {"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
             "kind": dev.type, "memory": memory,
             "threads": torch.get_num_threads(), "matmul_flops": flops, "matmul_size": n,
             "copy_bandwidth": bandwidth, "copy_bytes": size}
    del a, b, src, dst
    if base_dir is not None:
        info = inspect_model(base_dir)
        if info.params <= max_forward_params and info.layers > 0 and not info.adapter:
            probe.update(_forward_probe(Path(base_dir), info, dev, dtype, flops))
    return probe


def _forward_probe(base_dir: Path, info: ModelInfo, dev, dtype, flops: float) -> dict:
    import torch

    t = time.perf_counter()
    model, _ = load_model_and_tokenizer(base_dir, device=dev.type, dtype=dtype)
    first_load_s = time.perf_counter() - t     # includes one-time imports and device set-up
    del model
    t = time.perf_counter()
    model, _ = load_model_and_tokenizer(base_dir, device=dev.type, dtype=dtype)
    load_s = time.perf_counter() - t
    tokens = 8
    ids = torch.arange(1, tokens + 1, device=dev).unsqueeze(0) % max(info.vocab, 2)
    kwargs = {"decoder_input_ids": ids[:, :1]} if getattr(model.config, "is_encoder_decoder", False) else {}
    with torch.inference_mode():
        model(input_ids=ids, **kwargs)
        times = []
        for _ in range(7):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, **kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    call = sorted(times)[len(times) // 2]
    compute = 2.0 * info.matmul_params * tokens / flops
    del model
    return {"forward_s": call, "forward_tokens": tokens, "layer_overhead": max(call - compute, 0.0) / info.layers,
            "load_s": load_s, "first_load_s": first_load_s}


def calibrated_profile(hw: Profile, probe: dict) -> Profile:
    """``hw`` with throughput, bandwidth and overheads replaced by the measured figures.

    The plan is then for *this* device: the measured figures are achievable rates (so the
    efficiencies become 1), the kind (cuda/cpu) and memory size are this device's. Disk read and
    the per-tensor merge cost stay as the profile says.
    """
    sources = dict(hw.sources)
    changes = {"bf16_flops": probe["matmul_flops"], "matmul_efficiency": 1.0,
               "memory_bandwidth": probe["copy_bandwidth"], "bandwidth_efficiency": 1.0,
               "kind": probe["kind"], "memory": float(probe["memory"])}
    if "layer_overhead" in probe:
        changes["layer_overhead"] = probe["layer_overhead"]
        changes["load_overhead"] = probe["load_s"]
    for k in changes:
        sources[k] = f"measured by --calibrate on {probe['device']}"
    return replace(hw, name=f"{hw.name}+calibrated", label=f"{hw.label}, calibrated on {probe['device']}",
                   sources=sources, **changes)
