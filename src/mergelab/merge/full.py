"""The streaming merge engine: recipe → merged model folder, one tensor at a time.

1. **Open** the base (:class:`~mergelab.checkpoint.CheckpointReader`) and the experts
   (:func:`open_expert`: full checkpoints, or LoRA adapters applied to the base).
2. **Plan** from the headers alone, before anything is read or written: every tensor of the base
   must be found in every expert (directly, or through a tied alias such as T5's
   ``shared``/``encoder.embed_tokens``, or ``lm_head`` ↔ ``embed_tokens`` when the weights are
   tied), with the same shape (a vocabulary-size difference is an error, never truncated) and a
   compatible dtype. Only the base's tensor names are written, so the output matches the base's
   config. The shard layout is fixed here too.
3. **Stream**: worker threads each take one tensor — read its inputs, convert to float32 on the
   compute device, resolve the method parameters for its layer and module
   (:func:`~mergelab.recipe.resolve_params`), call the method, cast to the output dtype, and write
   its bytes straight into the planned place of its shard. The tensors in flight are bounded by
   memory (``1.25 ×`` what the largest tensor needs), so peak memory is about
   ``(inputs + 2) × the largest tensor``, whatever the model size. On the CPU, each worker runs
   torch with one thread and the workers run in parallel (one per core): this keeps every core busy
   without the synchronisation cost of splitting small operations, and the result does not depend
   on the number of workers.
4. **Finish**: copy config, tokenizer, generation config and chat template from the base, set the
   config's dtype, and rename the temporary folder into place (nothing is left on error).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mergelab.io.checkpoint import CheckpointReader, ShardedWriter, TensorSource, copy_model_files
from mergelab.util import atomic_output_dir, check_output_dir
from mergelab.errors import MergelabError, RecipeError, ShapeMismatchError
from mergelab.methods import MethodSpec, get_method
from mergelab.progress import ProgressBar
from mergelab.recipe import Recipe, layer_of, load_recipe, resolve_params
from mergelab.util import natural_key, pick_device

__all__ = ["merge", "open_expert", "resolve_params", "MergeResult", "MissingTensorError", "plan_merge"]


class MissingTensorError(ShapeMismatchError):
    """An expert lacks a tensor that the base has (a different architecture or size)."""


# Tensors that are one and the same in Hugging Face models, whatever the config says.
_ALWAYS_TIED = (("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
                ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"))
# Input embeddings and output heads, aliases of each other when ``tie_word_embeddings`` holds.
_INPUT_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "shared.weight",
                     "model.shared.weight", "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight",
                     "model.decoder.embed_tokens.weight", "encoder.embed_tokens.weight",
                     "decoder.embed_tokens.weight")
_OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
# Buffers that older checkpoints saved and that are recomputed on load.
_IGNORED_EXTRA = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


def _ties_embeddings(config: Mapping[str, Any] | None) -> bool:
    if not config:
        return True  # transformers' default
    for key in ("tie_word_embeddings", "tie_embeddings"):
        if key in config:
            return bool(config[key])
    text = config.get("text_config")
    return _ties_embeddings(text) if isinstance(text, Mapping) else True


def _aliases(name: str, tied: bool) -> list[str]:
    """Other names the same weights may be stored under."""
    out: list[str] = []
    for group in _ALWAYS_TIED:
        if name in group:
            out += [n for n in group if n != name]
    if tied:
        if name in _OUTPUT_EMBEDDINGS:
            out += list(_INPUT_EMBEDDINGS)
        elif name in _INPUT_EMBEDDINGS:
            out += list(_OUTPUT_EMBEDDINGS)
    return out



# ---------------------------------------------------------------------------------- experts


def open_expert(path: str | os.PathLike, base_reader: CheckpointReader) -> TensorSource:
    """An expert as a :class:`TensorSource`: a PEFT adapter folder (``adapter_config.json``) is
    applied to the base (``base + ΔW`` per adapted module); anything else is a checkpoint."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from mergelab.io.adapter import open_lora_expert

        return open_lora_expert(path, base_reader)
    return CheckpointReader(path)


def open_inputs(base_path, expert_paths, opened: list, open_one=open_expert) -> tuple[CheckpointReader, list]:
    """``(base reader, one source per expert)``; each is appended to ``opened`` as soon as it is
    open, so the caller's ``finally`` closes what was opened before a failure."""
    base = CheckpointReader(base_path)
    opened.append(base)
    experts = []
    for p in expert_paths:
        experts.append(open_one(p, base))
        opened.append(experts[-1])
    return base, experts


# ------------------------------------------------------------------------------------- plan


@dataclass
class TensorTask:
    """One output tensor: where its inputs come from and how it is written."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: list[tuple[TensorSource, str]]  # base first, then one per expert
    floating: bool
    num_layers: int
    work_bytes: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _describe(i: int, src: TensorSource) -> str:
    return f"expert {i} ({getattr(src, 'path', src)})"


def plan_merge(recipe: Recipe, base: CheckpointReader, experts: Sequence[TensorSource],
               spec: MethodSpec) -> list[TensorTask]:
    """Align names, shapes and dtypes across base and experts; one task per base tensor.

    Raises :class:`MissingTensorError` / :class:`ShapeMismatchError` naming the tensor, the expert
    and both shapes. Reads headers only.
    """
    names = sorted(base.keys(), key=natural_key)
    base_keys = set(names)
    depth: dict[str, int] = {}
    for n in names:
        loc = layer_of(n)
        if loc is not None:
            depth[loc[0]] = max(depth.get(loc[0], 0), loc[1] + 1)
    out_dtype = recipe.output.torch_dtype
    expert_keys = [set(e.keys()) for e in experts]
    expert_tied = [_ties_embeddings(getattr(e, "config", None)) for e in experts]
    base_tied = _ties_embeddings(base.config)

    # Tensors an expert has that the base lacks: aliases and stale buffers are fine, others not.
    for i, (src, keys) in enumerate(zip(experts, expert_keys)):
        extra = sorted(k for k in keys - base_keys if not _IGNORED_EXTRA.search(k)
                       and not any(a in base_keys for a in _aliases(k, expert_tied[i] or base_tied)))
        if extra:
            shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
            raise ShapeMismatchError(
                f"{_describe(i, src)} has {len(extra)} tensor(s) that the base lacks: {shown}",
                hint="experts must be fine-tunes of the base (same architecture and size)")
        if base_tied and not expert_tied[i]:
            own = [k for k in keys & set(_OUTPUT_EMBEDDINGS) if k not in base_keys]
            if own:
                raise ShapeMismatchError(
                    f"{_describe(i, src)} has its own (untied) {own[0]}, but the base ties it to the "
                    "input embeddings, so the merged model could not hold it",
                    hint="merge into a base with tie_word_embeddings: false, or use experts that keep the tie")

    tasks = []
    for name in names:
        shape, dtype = tuple(base.shape(name)), base.dtype(name)
        inputs: list[tuple[TensorSource, str]] = [(base, name)]
        for i, (src, keys) in enumerate(zip(experts, expert_keys)):
            src_name = name if name in keys else next(
                (a for a in _aliases(name, expert_tied[i]) if a in keys), None)
            if src_name is None:
                raise MissingTensorError(
                    f"{_describe(i, src)} has no tensor {name!r}, which the base has",
                    hint="experts must be fine-tunes of the base (same architecture and size)")
            e_shape, e_dtype = tuple(src.shape(src_name)), src.dtype(src_name)
            if e_shape != shape:
                vocab = ""
                if name in _INPUT_EMBEDDINGS + _OUTPUT_EMBEDDINGS and len(shape) == 2 and e_shape[1:] == shape[1:]:
                    vocab = (f" — vocabulary sizes differ (base {shape[0]} rows, expert {e_shape[0]});"
                             " mergelab never truncates or pads a vocabulary")
                raise ShapeMismatchError(
                    f"tensor {name!r}: base has shape {list(shape)}, {_describe(i, src)} has "
                    f"{list(e_shape)}{vocab}",
                    hint="resize the expert's embeddings to the base's tokenizer first" if vocab else
                    "experts must be fine-tunes of the base (same architecture and size)")
            if e_dtype.is_floating_point != dtype.is_floating_point or (
                    not dtype.is_floating_point and e_dtype != dtype):
                raise ShapeMismatchError(
                    f"tensor {name!r}: base stores {dtype}, {_describe(i, src)} stores {e_dtype}",
                    hint="floating-point tensors may differ in precision; other types must match")
            inputs.append((src, src_name))
        floating = dtype.is_floating_point
        loc = layer_of(name)
        task = TensorTask(name, shape, (out_dtype or dtype) if floating else dtype, inputs, floating,
                          depth.get(loc[0], 0) if loc else max(depth.values(), default=0))
        n_in = len(inputs)
        task.work_bytes = task.numel * (sum(s.dtype(n).itemsize for s, n in inputs) + 4 * n_in + 4
                                        + task.out_dtype.itemsize + n_in) if floating else \
            task.numel * dtype.itemsize * 2
        tasks.append(task)
    return tasks


# ------------------------------------------------------------------------------------ merge


@dataclass
class MergeResult:
    """What :func:`merge` did."""

    out_dir: Path
    tensors: int
    bytes_written: int
    device: str
    method: str
    workers: int
    seconds: dict[str, float] = field(default_factory=dict)
    copied_files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"merged {self.tensors} tensors ({self.bytes_written / 1e9:.2f} GB) with {self.method} "
                f"on {self.device} in {self.seconds.get('total', 0):.1f} s → {self.out_dir}")


def merge(recipe: Recipe | str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike, *,
          device: str = "auto", force: bool = False, progress: bool = True,
          workers: int | None = None) -> MergeResult:
    """Merge the models of ``recipe`` into ``out_dir`` (a Hugging Face model folder).

    ``recipe`` is a :class:`Recipe`, a recipe file, or a dict. ``device="auto"`` uses CUDA when
    present. An existing ``out_dir`` is refused unless ``force``. ``workers`` (tensors merged at
    once) defaults to the number of torch threads on the CPU and 2 on a GPU; the output bytes do
    not depend on it. With ``output.format: lora`` the work goes to
    :func:`mergelab.lora_merge.merge_to_adapter`.
    """
    t_start = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.output.format == "lora":
        from mergelab.merge.adapter import merge_to_adapter

        return merge_to_adapter(recipe, out_dir, device=device, force=force, progress=progress)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    dev = pick_device(device)
    spec = get_method(recipe.method.name)

    base_path = recipe.base.resolve()
    expert_paths = [e.resolve() for e in recipe.experts]
    check_not_an_input(out_dir, [base_path, *expert_paths])
    opened: list = []
    try:
        base, experts = open_inputs(base_path, expert_paths, opened)
        tasks = plan_merge(recipe, base, experts, spec)
        grams = data_statistics(recipe, base_path, expert_paths, experts, dev, progress)
        t_plan = time.perf_counter()

        n_workers = workers or (max(1, torch.get_num_threads()) if dev.type == "cpu" else 2)
        max_work = max((t.work_bytes for t in tasks), default=0)
        budget = max(int(1.25 * max_work), 256 << 20)
        torch_threads = torch.get_num_threads()
        with atomic_output_dir(out_dir, force) as tmp:
            writer = ShardedWriter(tmp, recipe.output.shard_size_bytes,
                                   layout=[(t.name, t.shape, t.out_dtype) for t in tasks])
            if dev.type == "cpu":  # parallel over tensors, not inside each small operation
                torch.set_num_threads(1)
            try:
                _run(tasks, recipe, spec, dev, writer, n_workers, budget, progress, grams)
            except BaseException:
                writer.abort()
                raise
            finally:
                torch.set_num_threads(torch_threads)
            index = writer.close()
            copied = copy_model_files(base_path, tmp) if Path(base_path).is_dir() else []
            _set_config_dtype(tmp / "config.json", recipe.output.dtype)
    finally:
        for src in opened:
            if hasattr(src, "close"):
                src.close()
    t_end = time.perf_counter()
    return MergeResult(out_dir=out_dir, tensors=len(tasks), bytes_written=index["metadata"]["total_size"],
                       device=str(dev), method=spec.name, workers=n_workers, copied_files=copied,
                       seconds={"plan": t_plan - t_start, "merge": t_end - t_plan, "total": t_end - t_start})


def check_not_an_input(out_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an output folder that is, or holds, one of the inputs (``--force`` would delete it)."""
    out_abs = out_dir.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if p == out_abs or out_abs in p.parents:
            raise MergelabError(f"the output folder {out_dir} holds an input ({p})",
                                hint="write the merge to a new folder")


def data_statistics(recipe: Recipe, base_path, expert_paths, experts: Sequence[TensorSource],
                    dev: torch.device, progress: bool) -> list | None:
    """The experts' input Gram matrices for a data-aware method (:mod:`mergelab.gram`), else None.

    Only the tensors the experts change are measured when every expert is a LoRA adapter."""
    from mergelab.merge.statistics import changed_names, recipe_grams

    say = None
    if progress:
        from rich.console import Console

        say = Console(stderr=True).print
    return recipe_grams(recipe, Path(base_path), [Path(p) for p in expert_paths],
                        names=changed_names(experts), device=dev, say=say)


def _set_config_dtype(config_file: Path, dtype: str | None) -> None:
    if dtype is None or not config_file.is_file():
        return
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
    for k in keys:
        cfg[k] = dtype
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class _BufferPool:
    """Reusable CPU byte buffers for reading inputs and casting outputs.

    Every tensor needs a few buffers as large as itself; allocating them afresh costs page faults
    (the kernel zeroes every page) that take as long as the merge arithmetic. Buffers are handed
    out best-fit and returned after each tensor, so the pool settles at what the tensors in flight
    need at once. A buffer more than 4× too large is not lent to a small request, so that small
    tensors do not pin the large buffers.
    """

    def __init__(self):
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= 4 * max(nbytes, 1 << 20)]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def give(self, *bufs: torch.Tensor) -> None:
        with self._lock:
            self._free.extend(bufs)


def _view(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = math.prod(shape) * dtype.itemsize
    return buf[:n].view(dtype).view(shape) if n else torch.empty(shape, dtype=dtype)


def _read_float32(src: TensorSource, name: str, dev: torch.device, pool: _BufferPool,
                  held: list) -> torch.Tensor:
    """Tensor ``name`` of ``src`` as float32 on ``dev``, through pooled buffers where possible."""
    if not isinstance(src, CheckpointReader):  # e.g. a LoRA expert computes base + ΔW itself
        return src.get(name).to(dev, torch.float32)
    shape, dtype = tuple(src.shape(name)), src.dtype(name)
    raw = pool.take(src.nbytes(name))
    native = src.read_into(name, raw)
    if dtype == torch.float32 and dev.type == "cpu":
        held.append(raw)
        return native
    if dev.type != "cpu":
        out = native.to(dev, torch.float32)
        pool.give(raw)
        return out
    f32 = pool.take(math.prod(shape) * 4)
    held.append(f32)
    out = _view(f32, shape, torch.float32)
    out.copy_(native)
    pool.give(raw)
    return out


def _merge_one(task: TensorTask, recipe: Recipe, spec: MethodSpec, dev: torch.device,
               writer: ShardedWriter, pool: _BufferPool, grams: list | None = None) -> None:
    """Read the inputs of one tensor, run the method, write the output."""
    (base_src, base_name), expert_inputs = task.inputs[0], task.inputs[1:]
    if not task.floating:  # integer/bool buffers: the base's, unchanged
        writer.add(task.name, base_src.get(base_name))
        return
    held: list[torch.Tensor] = []
    try:
        if spec.needs_base:
            base = _read_float32(base_src, base_name, dev, pool, held)
        else:  # the method ignores it: a zero view costs nothing
            base = torch.zeros((), dtype=torch.float32, device=dev).expand(task.shape)
        experts = [_read_float32(src, n, dev, pool, held) for src, n in expert_inputs]
        params = resolve_params(recipe, task.name, task.num_layers)
        if grams is not None:
            params.stats = [g.get(task.name, dev) for g in grams]
        if spec.needs_base and all(torch.equal(e, base) for e in experts):
            # Every task vector is zero (e.g. a tensor no LoRA expert adapts): every method gives
            # the base back, and skipping it avoids slow work such as TIES's top-k on zeros.
            out = base
        else:
            try:
                out = spec.fn(base, experts, params)
            except RecipeError as exc:
                raise RecipeError(f"{spec.name} on tensor {task.name!r}: {exc.message}", hint=exc.hint) from None
        del base, experts
        if tuple(out.shape) != task.shape:
            raise RuntimeError(f"merge method {spec.name} returned shape {tuple(out.shape)} for "
                               f"{task.name!r}, expected {task.shape}")
        if out.dtype != task.out_dtype or out.device.type != "cpu":
            buf = pool.take(out.numel() * task.out_dtype.itemsize)
            held.append(buf)
            cast = _view(buf, task.shape, task.out_dtype)
            cast.copy_(out)
            out = cast
        writer.add(task.name, out)
    finally:
        pool.give(*held)


def _run(tasks: list[TensorTask], recipe: Recipe, spec: MethodSpec, dev: torch.device,
         writer: ShardedWriter, n_workers: int, budget: int, show: bool, grams: list | None = None) -> None:
    """Merge every task with ``n_workers`` threads, keeping the work in flight under ``budget``."""
    pool = _BufferPool()

    def work(task: TensorTask) -> None:
        _merge_one(task, recipe, spec, dev, writer, pool, grams)

    bar = _Progress(len(tasks), sum(t.numel for t in tasks), show)
    pending = deque(tasks)
    inflight: dict = {}
    used = 0
    with bar, ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="mergelab") as pool_exec:
        try:
            while pending or inflight:
                while pending and len(inflight) < n_workers and (not inflight or used + pending[0].work_bytes <= budget):
                    task = pending.popleft()
                    inflight[pool_exec.submit(work, task)] = task
                    used += task.work_bytes
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = inflight.pop(fut)
                    used -= task.work_bytes
                    fut.result()
                    bar.advance(task)
        except BaseException:
            for fut in inflight:
                fut.cancel()
            raise


def _merge_columns() -> tuple:
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TextColumn("[bold]merging[/]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[done]}/{task.fields[n]} tensors"), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("[dim]{task.fields[current]}[/]"))


class _Progress(ProgressBar):
    """A progress bar over tensors (weighted by size), or nothing."""

    def __init__(self, n_tensors: int, n_elements: int, show: bool):
        super().__init__(show and n_tensors > 0, _merge_columns, n_elements, done=0, n=n_tensors, current="")
        self.count = 0

    def advance(self, task: TensorTask) -> None:
        self.count += 1
        self.update(advance=task.numel, done=self.count, current=task.name)
