"""Merge LoRA adapters in ΔW space into one PEFT adapter (``output: {format: lora}``).

Every expert is a LoRA adapter of the recipe's base. For each adapted weight matrix the experts'
changes are ``ΔWᵢ = scale · Bᵢ Aᵢ`` (zero for an adapter without that module) and the merged
change ``ΔW`` is computed by the cheapest exact route the method allows:

``factors``
    the low-rank methods ``cat``, ``tsv``, ``iso_c``, ``knots``
    (registered with ``factors=``) work on the factors directly;
``concat``
    a method that is linear in the task vectors (``linear`` with normalised weights,
    ``task_arithmetic``, ...) gives ``ΔW = Σ cᵢ ΔWᵢ`` with coefficients ``cᵢ`` read off the method
    itself, i.e. the concatenation ``[c₁B₁ … c_TB_T] @ [A₁; …; A_T]`` — exact, rank Σ rᵢ;
``ties-factors``
    TIES (registered with ``from_factors=``) is evaluated from the factors in small row blocks (the same result as the registered
    ``ties`` on the materialised ΔWᵢ, without ever holding them);
``dense``
    any other method runs on the materialised ΔWᵢ of this one module, from a zero base;
``dense-from-base``
    … or, when the method is not translation-invariant (``fn(W, W+Δ) − W ≠ fn(0, Δ)``, e.g.
    ``slerp``), on ``W + ΔWᵢ`` with ``ΔW = fn(W, …) − W``; the result is then rarely low-rank,
    which the recorded error shows.

The adapter output is exact where the route is (ranks add up: Σ rᵢ), unless ``output.rank`` asks
for less or ``output.energy`` for a share of the energy: then, and for the dense routes always,
``ΔW`` is re-factored by a truncated SVD — exact via QR of the stacked factors for the factor
routes (:func:`~mergelab.methods.lowrank.truncate`), randomised with a measured error for dense matrices
(:func:`~mergelab.methods.lowrank.lowrank_approx`). A dense route without ``output.rank`` keeps Σ rᵢ (the
rank an exact linear merge would need). The relative reconstruction error
``‖ΔW − B'A'‖_F / ‖ΔW‖_F`` of every module is written to ``merge_report.json`` beside the adapter.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods.lowrank import LowRank, concat, lowrank_approx, truncate
from mergelab.io.adapter import (LoraExpertSource, OutputModule, open_lora_expert, write_adapter)
from mergelab.methods import MethodParams, MethodSpec
from mergelab.progress import ProgressBar
from mergelab.recipe import layer_depths
from mergelab.util import natural_key, single_torch_thread
from mergelab.util import atomic_output_dir
from mergelab.merge.inputs import RESULT, check_finite, check_identity, describe_expert, open_inputs, prepare_inputs
from mergelab.merge.datastats import data_statistics
from mergelab.merge.card import write_merge_card
from mergelab.recipe import Recipe, layer_of, load_recipe, resolve_params

REPORT_NAME = "merge_report.json"


# ------------------------------------------------------------------------------- method probes


def _clone_params(p: MethodParams) -> MethodParams:
    gen = None
    if p.generator is not None:
        gen = torch.Generator(device=p.generator.device)
        gen.set_state(p.generator.get_state())
    return MethodParams(globals=dict(p.globals), experts=[dict(e) for e in p.experts], generator=gen)


def _probe_data(n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``n`` task vectors (8×8) whose sums are exact in float32 and whose magnitudes
    are all distinct, so that no rounding or tie can tell two mathematically equal results apart."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-4, 5, (8, 8), generator=g).float()
    deltas = []
    for _ in range(n):
        mag = (torch.randperm(64, generator=g) + 1).float().view(8, 8) / 16
        sign = torch.randint(0, 2, (8, 8), generator=g).float() * 2 - 1
        deltas.append(mag * sign)
    return base, deltas


def _close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= 1e-5 * max(scale, 1.0)


def translation_invariant(spec: MethodSpec, p: MethodParams, n: int) -> bool:
    """Whether ``fn(W, [W + Δᵢ]) − W == fn(0, [Δᵢ])`` for these parameters (tested on a probe).

    True for every task-vector method (TIES, DARE, ...); false for ``slerp`` and for ``linear``
    with weights that do not sum to 1 without normalisation (the base weights get scaled too).
    """
    base, deltas = _probe_data(n)
    scale = float(base.abs().max()) + max(float(d.abs().max()) for d in deltas)
    plain = spec.fn(torch.zeros_like(base), deltas, _clone_params(p))
    shifted = spec.fn(base, [base + d for d in deltas], _clone_params(p)) - base
    return _close(plain, shifted, scale)


def linear_coefficients(spec: MethodSpec, p: MethodParams, n: int) -> list[float] | None:
    """``cᵢ`` with ``fn(W, [W + Δᵢ]) − W = Σ cᵢ Δᵢ``, or None if the method is not that for ``p``.

    Only methods registered ``linear_in_delta`` are asked. The coefficients are read off the
    method itself — ``fn(0, [e₁, …, e_n])`` with unit vectors ``eᵢ`` is ``c`` — and then checked
    on a probe with a non-zero base, so a method whose base does not cancel (``linear`` without
    normalisation) is caught.
    """
    if not spec.linear_in_delta or spec.random:
        return None
    eye = torch.eye(n)
    coeffs = spec.fn(torch.zeros(n), [eye[i] for i in range(n)], _clone_params(p))
    base, deltas = _probe_data(n)
    got = spec.fn(base, [base + d for d in deltas], _clone_params(p)) - base
    want = sum(float(c) * d for c, d in zip(coeffs, deltas))
    scale = float(base.abs().max()) + max(float(d.abs().max()) for d in deltas) * float(coeffs.abs().sum())
    return [float(c) for c in coeffs] if _close(got, want, scale) else None


# ------------------------------------------------------------------------------- TIES on factors


# ------------------------------------------------------------------------------- one module


@dataclass
class ModuleResult:
    """The merged ΔW of one module as factors, and how it was obtained."""

    name: str
    factors: LowRank
    route: str
    input_rank: int
    rel_error: float


def _limit(lr: LowRank, rank: int | None, energy: float | None) -> tuple[LowRank, float]:
    """Keep an exact factorisation as it is unless a rank or energy limit asks for less."""
    if energy is None and (rank is None or rank >= lr.rank):
        return lr, 0.0
    return truncate(lr, rank, energy)


def svd_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of the randomised SVD of one tensor, from (recipe seed, tensor name)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00lora-svd".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def merge_module(name: str, parts: Sequence[LowRank | None], spec: MethodSpec, p: MethodParams,
                 shape: tuple[int, int], *, rank: int | None = None, energy: float | None = None,
                 base_tensor: Callable[[], torch.Tensor] | None = None, seed: int = 0,
                 device: torch.device = torch.device("cpu"), exact_ties: bool = True) -> ModuleResult:
    """Merge one module's ΔWᵢ (``None``: the adapter lacks it) into factors; see the module doc."""
    try:
        return _merge_module(name, parts, spec, p, shape, rank, energy, base_tensor, seed, device, exact_ties)
    except RecipeError as exc:
        raise RecipeError(f"{spec.name} on tensor {name!r}: {exc.message}", hint=exc.hint) from None


def _merge_module(name, parts, spec, p, shape, rank, energy, base_tensor, seed, device, exact_ties) -> ModuleResult:
    in_rank = sum(q.rank for q in parts if q is not None)
    if spec.factors is not None:
        lr, err = _limit(spec.factors(parts, p, shape), rank, energy)
        return ModuleResult(name, lr, "factors", in_rank, err)
    coeffs = linear_coefficients(spec, p, len(parts))
    if coeffs is not None:
        lr, err = _limit(concat(parts, coeffs, shape), rank, energy)
        return ModuleResult(name, lr, "concat", in_rank, err)
    merged, route = None, "ties-factors"
    if spec.from_factors is not None:
        merged = spec.from_factors(parts, p, shape, device, exact_cut=exact_ties)
    if merged is None:
        merged, route = _dense_merge(spec, p, parts, shape, base_tensor, device)
    target = rank if rank is not None else max(1, min(in_rank, min(shape)))
    lr, err = lowrank_approx(merged, target, energy, generator=svd_generator(seed, name))
    return ModuleResult(name, lr, route, in_rank, err)


def _dense_merge(spec, p, parts, shape, base_tensor, device) -> tuple[torch.Tensor, str]:
    deltas = [q.dense() if q is not None else torch.zeros(shape, device=device) for q in parts]
    if translation_invariant(spec, p, len(parts)):
        return spec.fn(torch.zeros(shape, device=device), deltas, p), "dense"
    if base_tensor is None:
        raise RecipeError(f"{spec.name} is not a task-vector method (its result depends on the base "
                          "weights themselves) and no base tensor was given")
    w = base_tensor().to(device, torch.float32)
    for d in deltas:
        d.add_(w)
    return spec.fn(w, deltas, p) - w, "dense-from-base"


# ------------------------------------------------------------------------------- the pipeline


def merge_lora_experts(base, experts: Sequence[LoraExpertSource], spec: MethodSpec,
                       params_for: Callable[[str], MethodParams], *, rank: int | None = None,
                       energy: float | None = None, device: torch.device = torch.device("cpu"),
                       seed: int = 0, workers: int | None = None, exact_ties: bool = True,
                       on_module: Callable[[ModuleResult], None] | None = None,
                       finite: bool = True) -> list[ModuleResult]:
    """Merge every module that at least one adapter changes; results in the base's tensor order.

    ``base`` is the base :class:`~mergelab.io.checkpoint.TensorSource` (read only by the
    ``dense-from-base`` route), ``params_for(name)`` the method parameters of one tensor.
    ``workers`` modules are merged at once (default: one per torch thread on the CPU, each
    running torch single-threaded, as the engine does, so the bits do not depend on ``workers``;
    one on a GPU); only their factors (and, on the dense routes, their ΔWᵢ) are held.
    ``finite``: refuse NaN/Inf in an expert's factors or in the merged factors
    (:class:`~mergelab.errors.NonFiniteError`).
    """
    names = sorted({n for e in experts for n in e.modules}, key=natural_key)
    threads = torch.get_num_threads()
    n_workers = workers or (max(1, threads) if device.type == "cpu" else 1)

    def work(name: str) -> ModuleResult:
        parts = [e.factors(name) for e in experts]
        if finite:
            for i, (e, q) in enumerate(zip(experts, parts)):
                if q is not None:
                    check_finite(q.B, name, f"{describe_expert(i, e)} (LoRA B)")
                    check_finite(q.A, name, f"{describe_expert(i, e)} (LoRA A)")
        parts = [None if q is None else q.to(device) for q in parts]
        res = merge_module(name, parts, spec, params_for(name), tuple(base.shape(name)), rank=rank,
                           energy=energy, base_tensor=lambda: base.get(name), seed=seed, device=device,
                           exact_ties=exact_ties)
        out = res.factors.to("cpu")
        if finite:
            check_finite(out.B, name, RESULT)
            check_finite(out.A, name, RESULT)
        return ModuleResult(res.name, out, res.route, res.input_rank, res.rel_error)

    results: list[ModuleResult] = []
    if device.type == "cpu":  # single-threaded torch per module: the same bits for any worker count
        torch.set_num_threads(1)
    try:
        init = single_torch_thread if device.type == "cpu" else None
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="mergelab-lora", initializer=init) as pool:
            pending = deque(names)
            inflight: deque = deque()     # submitted, in module order (running, or done and not yet taken)
            window = 4 * n_workers        # finished results waiting for an earlier module stay few
            try:
                while pending or inflight:
                    # keep every worker busy: a small module finished early must not leave a worker idle
                    # behind a large one at the head (q_proj next to v_proj would halve the speed)
                    while pending and len(inflight) < window and sum(not f.done() for f in inflight) < n_workers:
                        inflight.append(pool.submit(work, pending.popleft()))
                    if not inflight[0].done():
                        running = [f for f in inflight if not f.done()]
                        wait(running, return_when=FIRST_COMPLETED)
                        continue
                    res = inflight.popleft().result()   # in order: the output does not depend on timing
                    results.append(res)
                    if on_module is not None:
                        on_module(res)
            except BaseException:
                for fut in inflight:
                    fut.cancel()
                raise
    finally:
        torch.set_num_threads(threads)
    return results


@dataclass
class LoraMergeResult:
    """What :func:`merge_to_adapter` did."""

    out_dir: Path
    modules: int
    max_rank: int
    parameters: int
    max_rel_error: float
    routes: dict[str, int]
    device: str
    method: str
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        routes = ", ".join(f"{k} {v}" for k, v in sorted(self.routes.items()))
        return (f"merged {self.modules} LoRA modules with {self.method} on {self.device} into one adapter "
                f"(rank ≤ {self.max_rank}, {self.parameters / 1e6:.2f} M parameters; routes: {routes}; "
                f"largest relative error {self.max_rel_error:.2e}) in {self.seconds.get('total', 0):.1f} s "
                f"→ {self.out_dir}")


def _common(values, default=None):
    vals = set(values)
    return vals.pop() if len(vals) == 1 else default


def merge_to_adapter(recipe, out_dir: str | os.PathLike, *, device: str = "auto", force: bool = False,
                     progress: bool = True, workers: int | None = None,
                     exact_ties: bool = True, warn: Callable[[str], None] | None = None,
                     card: bool = True) -> LoraMergeResult:
    """Merge the recipe's LoRA experts into one PEFT adapter in ``out_dir`` (``output.format: lora``).

    Writes ``adapter_config.json``, ``adapter_model.safetensors``, ``merge_report.json`` (method,
    inputs, and per module the route, ranks and relative reconstruction error) and, with ``card``,
    the model card ``README.md`` (:mod:`mergelab.merge.card`) into a temporary
    folder that is renamed into place at the end. Every expert must be a LoRA adapter of the base.
    ``exact_ties=False`` (or the recipe's ``output.ties_cuts: sampled``) takes TIES' magnitude
    cuts from a sample instead of a pass over every
    ΔWᵢ: about twice as fast for many large adapters, but a different TIES result (each kept
    share within ~1.5 % of ``density``; see :func:`magnitude_cuts`).
    """

    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    inputs = prepare_inputs(recipe, out_dir, force=force, device=device, adapters_only=True)
    out_dir, dev, spec = inputs.out_dir, inputs.device, inputs.spec
    base_path, expert_paths = inputs.base_path, inputs.expert_paths
    opened: list = []
    try:
        base, experts = open_inputs(base_path, expert_paths, opened, open_lora_expert)
        warnings = check_identity(recipe, base, experts, warn)
        kinds = {}
        for e in experts:
            for name, mod in e.modules.items():
                if kinds.setdefault(name, mod.kind) != mod.kind:
                    raise RecipeError(f"tensor {name!r} is adapted as {kinds[name]} by one expert and "
                                      f"as {mod.kind} by {e.path}")
        grams = data_statistics(recipe, base_path, expert_paths, experts, dev, progress)
        base_names = base.keys()
        depth = layer_depths(base_names)
        deepest = max(depth.values(), default=0)

        def params_for(name: str) -> MethodParams:
            loc = layer_of(name)
            p = resolve_params(recipe, name, depth.get(loc[0], 0) if loc else deepest)
            if grams is not None:
                p.stats = [g.get(name, dev) for g in grams]
            return p

        with _Progress(len(kinds), progress) as bar:
            results = merge_lora_experts(base, experts, spec, params_for, rank=recipe.output.rank,
                                         energy=recipe.output.energy, device=dev, seed=recipe.seed,
                                         workers=workers, exact_ties=exact_ties and recipe.output.ties_cuts == "exact",
                                         on_module=bar.advance, finite=not recipe.output.allow_nonfinite)
        t_merge = time.perf_counter()
        modules = {r.name: OutputModule(r.factors, kinds[r.name]) for r in results}
        dtype = recipe.output.torch_dtype or _common((e.adapter.dtype for e in experts), torch.float32)
        base_id = recipe.base.model if recipe.base.model is not None else str(Path(base_path).absolute())
        report = _report(recipe, spec, experts, results, dtype)
        with atomic_output_dir(out_dir, force) as tmp:
            write_adapter(tmp, modules, base_model_name_or_path=base_id,
                          task_type=_common(e.adapter.task_type for e in experts),
                          dtype=dtype, base_keys=base_names, revision=recipe.base.revision)
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            if card:
                warnings += write_merge_card(tmp, recipe, base_path, expert_paths, warn)
    finally:
        for src in opened:
            src.close()
    t_end = time.perf_counter()
    written = [r for r in results if r.factors.rank > 0]
    routes: dict[str, int] = {}
    for r in results:
        routes[r.route] = routes.get(r.route, 0) + 1
    return LoraMergeResult(
        out_dir=out_dir, modules=len(written), max_rank=max((r.factors.rank for r in written), default=0),
        parameters=sum(r.factors.B.numel() + r.factors.A.numel() for r in written),
        max_rel_error=max((r.rel_error for r in results), default=0.0), routes=routes, device=str(dev),
        method=spec.name, seconds={"merge": t_merge - t0, "total": t_end - t0}, warnings=warnings)


def _report(recipe, spec: MethodSpec, experts: Sequence[LoraExpertSource], results: Sequence[ModuleResult],
            dtype: torch.dtype) -> dict:
    errors = [r.rel_error for r in results]
    return {
        "method": {"name": spec.name, **recipe.method.params},
        "seed": recipe.seed,
        "base": str(recipe.base),
        "experts": [{"path": str(e.path), "base_model_name_or_path": e.adapter.base_model_name_or_path,
                     "modules": len(e.modules), "ranks": sorted({m.rank for m in e.modules.values()}),
                     **dict(recipe.experts[i].params)} for i, e in enumerate(experts)],
        "output": {"rank": recipe.output.rank, "energy": recipe.output.energy, "dtype": str(dtype).removeprefix("torch.")},
        "summary": {"modules": len(results), "max_rel_error": max(errors, default=0.0),
                    "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
                    "max_rank": max((r.factors.rank for r in results), default=0)},
        "modules": {r.name: {"route": r.route, "input_rank": r.input_rank, "rank": r.factors.rank,
                             "rel_error": r.rel_error} for r in results},
    }


def _module_columns() -> tuple:
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TextColumn("[bold]merging adapters[/]"), BarColumn(),
            TextColumn("{task.completed}/{task.total} modules"), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("[dim]{task.fields[current]}[/]"))


class _Progress(ProgressBar):
    """A progress bar over modules, or nothing."""

    def __init__(self, total: int, show: bool):
        super().__init__(show, _module_columns, total, current="")

    def advance(self, res: ModuleResult) -> None:
        self.update(advance=1, current=f"{res.name} ({res.route}, rank {res.factors.rank})")
