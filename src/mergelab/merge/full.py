"""The streaming merge engine: recipe → merged model folder, one tensor at a time.

1. **Open** the base (:class:`~mergelab.io.checkpoint.CheckpointReader`) and the experts
   (:func:`open_expert`: full checkpoints, or LoRA adapters applied to the base).
2. **Plan** from the headers alone, before anything is read or written: every tensor of the base
   must be found in every expert (directly, or through a tied alias such as T5's
   ``shared``/``encoder.embed_tokens``, or ``lm_head`` ↔ ``embed_tokens`` when the weights are
   tied), with the same shape (a vocabulary-size difference is an error, never truncated, unless
   the recipe has a ``tokenizer`` section: then the embedding and head rows of every model are
   aligned by token to the output tokenizer first, :mod:`mergelab.merge.vocab`) and a
   compatible dtype; each expert's config.json (or adapter's recorded base) must name the base's
   model (:func:`~mergelab.merge.inputs.check_identity`). Only the base's tensor names are written, so the output matches the base's
   config. The shard layout is fixed here too.
3. **Stream**: worker threads each take one tensor — read its inputs, convert to float32 on the
   compute device, resolve the method parameters for its layer and module
   (:func:`~mergelab.recipe.resolve_params`), call the method, cast to the output dtype, and write
   its bytes straight into the planned place of its shard. Inputs and result are checked for
   NaN/Inf on the way (one float32 sum each; refused unless ``output.allow_nonfinite``).
   A tensor whose inputs take more than ``block_bytes`` (default 128 MiB of float32, all inputs
   together) is merged in **row blocks** (:func:`plan_blocks`): each input is read by rows
   (``pread`` of those rows' bytes; a LoRA expert builds ``base + ΔW`` for those rows from its
   factors), the method's whole-tensor statistics are gathered in passes over the blocks
   (:class:`~mergelab.methods.Blockwise`: norms, Gram matrices, exact magnitude cuts, the random
   generator's state at each block) and then each block is merged and written where its rows go.
   Blocks start at multiples of the methods' reduction chunk, so the bytes are the whole-tensor
   merge's exactly (``tests/test_blocks.py``). Memory is then bounded by the block, not by the
   largest tensor, the vocabulary or the number of experts: about two workers × 2.5 × the block
   budget, plus the process (RegMean adds its ``in × in`` Gram matrices, WUDI each expert's
   ``τᵢᵀτᵢ``, Iso-C ``MᵀM``). Methods without a block form (SVD-based; WUDI and Iso-C on a
   narrowing layer) take the whole tensor, ``(inputs + 2) ×`` its float32 size. The tensors in flight are bounded by memory
   (``1.25 ×`` what the largest unit of work needs). On the CPU, each worker runs torch with one
   thread and the workers run in parallel (one per core): this keeps every core busy without the
   synchronisation cost of splitting small operations, and the result does not depend on the
   number of workers. On CUDA, reads go through pinned buffers and copy to the device
   asynchronously, so one worker's read overlaps another's compute.
4. **Finish**: copy config, tokenizer, generation config and chat template from the base (with a
   ``tokenizer`` section: write the output tokenizer and its ``vocab_size``), set the config's dtype, write the model card (:mod:`mergelab.merge.card`), and rename the temporary folder into place (nothing is left on error).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mergelab.io.checkpoint import CheckpointReader, ShardedWriter, TensorSource, copy_model_files
from mergelab.util import atomic_output_dir
from mergelab.errors import RecipeError
from mergelab.methods import Block, MethodSpec, Passes, chunk_size, sample_rows
from mergelab.progress import ProgressBar
from mergelab.recipe import Recipe, resolve_params
from mergelab.util import fixed_mmap_threshold, single_torch_thread
from mergelab.merge.inputs import (RESULT, TensorTask, align_tensors, check_finite, check_identity, describe_expert, open_inputs, prepare_inputs)
from mergelab.merge.datastats import data_statistics
from mergelab.merge.vocab import align_vocab_tasks, plan_vocabulary, save_tokenizer
from mergelab.merge.card import write_merge_card

__all__ = ["merge_full", "MergeResult"]


# ---------------------------------------------------------------------------------- experts


# ------------------------------------------------------------------------------------- plan


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
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"merged {self.tensors} tensors ({self.bytes_written / 1e9:.2f} GB) with {self.method} "
                f"on {self.device} in {self.seconds.get('total', 0):.1f} s → {self.out_dir}")


#: float32 bytes of one row block's inputs together (base and experts): a tensor whose inputs
#: take more is merged in blocks, so the memory does not grow with the experts' count or the
#: vocabulary
BLOCK_BYTES = 128 << 20


def merge_full(recipe: Recipe, out_dir: str | os.PathLike, *, device: str = "auto", force: bool = False,
               progress: bool = True, workers: int | None = None,
               warn: Callable[[str], None] | None = None, card: bool = True,
               block_bytes: int = BLOCK_BYTES) -> MergeResult:
    """Merge the models of ``recipe`` into ``out_dir``, a Hugging Face model folder (``output.format: full``).

    ``device="auto"`` uses CUDA when present. An existing ``out_dir`` is refused unless ``force``.
    ``workers`` (tensors merged at once) defaults to the number of torch threads on the CPU and 2
    on a GPU; the output bytes do not depend on it. ``warn`` receives the warnings of the identity
    check (:func:`~mergelab.merge.inputs.check_identity`) and the model card's licence warnings, also kept
    in the result. ``card`` writes the model card ``README.md`` (:mod:`mergelab.merge.card`); ``mergelab
    run`` writes its own. ``block_bytes`` bounds the float32 bytes of one input read at once: a
    larger tensor is merged in row blocks (its method's :class:`~mergelab.methods.Blockwise` form,
    with whole-tensor statistics in passes over the blocks first), with the same bytes out.
    Callers go through :func:`mergelab.merge.merge`.
    """
    t_start = time.perf_counter()
    inputs = prepare_inputs(recipe, out_dir, force=force, device=device)
    out_dir, dev, spec = inputs.out_dir, inputs.device, inputs.spec
    base_path, expert_paths = inputs.base_path, inputs.expert_paths
    opened: list = []
    scratch: Path | None = None
    try:
        base, experts = open_inputs(base_path, expert_paths, opened)
        warnings = check_identity(recipe, base, experts, warn)
        vocab = plan_vocabulary(recipe, base_path, expert_paths, base, experts, warn)
        tasks = align_tensors(recipe, base, experts, spec, vocab_size=None if vocab is None else vocab.size)
        if vocab is not None:   # the embedding rows permuted to the output tokenizer, in a scratch folder
            warnings += vocab.warnings
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            for stale in out_dir.parent.glob(f".{out_dir.name}.mergelab-vocab-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.mergelab-vocab-", dir=out_dir.parent))
            align_vocab_tasks(tasks, vocab, scratch, opened)
        grams = data_statistics(recipe, base_path, expert_paths, experts, dev, progress)
        for task in tasks:
            plan_blocks(task, spec, dev, block_bytes, resolve_params(recipe, task.name, task.num_layers))
        t_plan = time.perf_counter()

        n_workers = workers or (max(1, torch.get_num_threads()) if dev.type == "cpu" else 2)
        max_work = max((t.work_bytes for t in tasks), default=0)
        budget = max(int(1.25 * max_work), 256 << 20)
        torch_threads = torch.get_num_threads()
        with atomic_output_dir(out_dir, force) as tmp, fixed_mmap_threshold():
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
            if vocab is not None:
                written = save_tokenizer(vocab, tmp, tmp / "config.json")
                copied = sorted({c for c in copied if (tmp / c).exists()} | set(written))
            _set_config_dtype(tmp / "config.json", recipe.output.dtype)
            if card:
                warnings += write_merge_card(tmp, recipe, base_path, expert_paths, warn)
    finally:
        for src in opened:
            if hasattr(src, "close"):
                src.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    t_end = time.perf_counter()
    return MergeResult(out_dir=out_dir, tensors=len(tasks), bytes_written=index["metadata"]["total_size"],
                       device=str(dev), method=spec.name, workers=n_workers, copied_files=copied, warnings=warnings,
                       seconds={"plan": t_plan - t_start, "merge": t_end - t_plan, "total": t_end - t_start})


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

    def __init__(self, pinned: bool = False):
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.pinned = pinned  # page-locked buffers: host → GPU copies run asynchronously

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= 4 * max(nbytes, 1 << 20)]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)

    def give(self, *bufs: torch.Tensor) -> None:
        with self._lock:
            self._free.extend(bufs)


def _view(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = math.prod(shape) * dtype.itemsize
    return buf[:n].view(dtype).view(shape) if n else torch.empty(shape, dtype=dtype)


def _to_device(native: torch.Tensor, raw: torch.Tensor, dev: torch.device, pool: _BufferPool) -> torch.Tensor:
    """Copy a host tensor read into the pooled buffer ``raw`` to ``dev`` as float32.

    From a pinned buffer the copy is asynchronous; the buffer goes back to the pool once the
    copy (not the work queued after it) is done, so another worker's read overlaps this one's
    compute.
    """
    if not pool.pinned:
        out = native.to(dev, torch.float32)
        pool.give(raw)
        return out
    moved = native.to(dev, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    out = moved.float() if moved.dtype != torch.float32 else moved
    done.synchronize()
    pool.give(raw)
    return out


def _read_float32(src: TensorSource, name: str, dev: torch.device, pool: _BufferPool,
                  held: list, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Tensor ``name`` of ``src`` (or only its ``rows`` [r0, r1)) as float32 on ``dev``, through
    pooled buffers where possible."""
    if not isinstance(src, CheckpointReader):  # e.g. a LoRA expert computes base + ΔW itself
        return (src.get(name) if rows is None else src.get_rows(name, *rows)).to(dev, torch.float32)
    dtype = src.dtype(name)
    if rows is None:
        raw = pool.take(src.nbytes(name))
        native = src.read_into(name, raw)
    else:
        raw = pool.take((rows[1] - rows[0]) * math.prod(src.shape(name)[1:]) * dtype.itemsize)
        native = src.read_rows_into(name, *rows, raw)
    if dtype == torch.float32 and dev.type == "cpu":
        held.append(raw)
        return native
    if dev.type != "cpu":
        return _to_device(native, raw, dev, pool)
    f32 = pool.take(native.numel() * 4)
    held.append(f32)
    out = _view(f32, tuple(native.shape), torch.float32)
    out.copy_(native)
    pool.give(raw)
    return out


def plan_blocks(task: TensorTask, spec: MethodSpec, dev: torch.device, block_bytes: int, params=None) -> None:
    """Set ``task.block_rows`` (rows per block; 0 = whole tensor) and its work bytes per block.

    A tensor is split when its inputs' float32 size exceeds ``block_bytes``, its method has a block form
    and every input can be read by rows. Blocks hold whole rows and, except the last, a multiple
    of the reduction chunk, so the method's chunked sums line up with the whole tensor's.
    """
    task.block_rows = 0
    per_input = block_bytes // len(task.inputs)
    if not task.floating or not spec.blocks or task.numel * 4 <= per_input or not task.shape:
        return
    if spec.blockwise is not None and spec.blockwise.only_if is not None and not spec.blockwise.only_if(params, task.shape):
        return
    if not all(isinstance(src, CheckpointReader) or hasattr(src, "get_rows") for src, _ in task.inputs):
        return
    cols = math.prod(task.shape[1:])
    chunk = chunk_size(dev)
    step = chunk // math.gcd(cols, chunk)           # rows per aligned unit
    rows = max(step, (per_input // 4 // max(cols, 1)) // step * step)
    if rows >= task.shape[0] or rows * cols * 4 > 4 * per_input:
        return
    task.block_rows = rows
    task.work_bytes = task.work_bytes * rows // task.shape[0]


def _unchanged(task: TensorTask) -> bool:
    """Every expert is a LoRA adapter that leaves this tensor alone: the result is the base's."""
    experts = task.inputs[1:]
    return bool(experts) and all(hasattr(src, "changes") and not src.changes(n) for src, n in experts)


def _cast_out(out: torch.Tensor, task: TensorTask, pool: _BufferPool, held: list) -> torch.Tensor:
    """``out`` in the output dtype on the CPU, through a pooled buffer when it must be converted."""
    if out.dtype != task.out_dtype or out.device.type != "cpu":
        buf = pool.take(out.numel() * task.out_dtype.itemsize)
        held.append(buf)
        cast = _view(buf, tuple(out.shape), task.out_dtype)
        cast.copy_(out)
        return cast
    return out


def _merge_blocks(task: TensorTask, recipe: Recipe, spec: MethodSpec, dev: torch.device,
                  writer: ShardedWriter, pool: _BufferPool, params) -> None:
    """One tensor in row blocks: the method's statistics pass(es), then one block at a time."""
    (base_src, base_name), expert_inputs = task.inputs[0], task.inputs[1:]
    n_rows, cols, step = task.shape[0], math.prod(task.shape[1:]), task.block_rows
    finite = not recipe.output.allow_nonfinite
    passes_done = [0]

    def passes():
        first = passes_done[0] == 0
        passes_done[0] += 1
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            held: list[torch.Tensor] = []
            try:
                if spec.needs_base:
                    base = _read_float32(base_src, base_name, dev, pool, held, (r0, r1))
                else:
                    base = torch.zeros((), dtype=torch.float32, device=dev).expand(r1 - r0, *task.shape[1:])
                experts = [_read_float32(src, n, dev, pool, held, (r0, r1)) for src, n in expert_inputs]
                if first and finite:
                    if spec.needs_base:
                        check_finite(base, task.name, "the base")
                    for i, ((src, _), e) in enumerate(zip(expert_inputs, experts)):
                        check_finite(e, task.name, describe_expert(i, src))
                yield Block(r0 * cols, base, experts, task.shape)
                del base, experts
            finally:
                pool.give(*held)

    def sample() -> Block:   # a few rows spread over the tensor, read apart from the passes
        rows = sample_rows(n_rows, cols)

        def read(src, name):
            return torch.cat([src.get_rows(name, r, r + 1) for r in rows]).to(dev, torch.float32)

        base = read(base_src, base_name) if spec.needs_base else \
            torch.zeros((), dtype=torch.float32, device=dev).expand(len(rows), *task.shape[1:])
        return Block(-1, base, [read(src, n) for src, n in expert_inputs], task.shape)

    try:
        if spec.blockwise is not None:
            layout = [(r0 * cols, (min(n_rows, r0 + step) - r0) * cols) for r0 in range(0, n_rows, step)]
            state = spec.blockwise.stats(Passes(passes, len(expert_inputs), sample if cols >= 256 else None, dev, layout),
                                         params, task.shape)
            apply = lambda blk: spec.blockwise.apply(blk, state, params)  # noqa: E731
        else:
            apply = lambda blk: spec.fn(blk.base, blk.experts, params)  # noqa: E731
        for blk in passes():
            out = apply(blk)
            if tuple(out.shape) != tuple(blk.base.shape):
                raise RuntimeError(f"merge method {spec.name} returned shape {tuple(out.shape)} for a "
                                   f"block of {task.name!r}, expected {tuple(blk.base.shape)}")
            held: list[torch.Tensor] = []
            try:
                out = _cast_out(out, task, pool, held)
                if finite:
                    check_finite(out, task.name, RESULT)
                writer.add_rows(task.name, blk.start // max(cols, 1), out)
            finally:
                pool.give(*held)
    except RecipeError as exc:
        raise RecipeError(f"{spec.name} on tensor {task.name!r}: {exc.message}", hint=exc.hint) from None


def _merge_one(task: TensorTask, recipe: Recipe, spec: MethodSpec, dev: torch.device,
               writer: ShardedWriter, pool: _BufferPool, grams: list | None = None) -> None:
    """Read the inputs of one tensor, run the method, write the output."""
    (base_src, base_name), expert_inputs = task.inputs[0], task.inputs[1:]
    if not task.floating:  # integer/bool buffers: the base's, unchanged
        writer.add(task.name, base_src.get(base_name))
        return
    params = resolve_params(recipe, task.name, task.num_layers)
    if spec.needs_base and _unchanged(task):
        # Every task vector is zero (a tensor no LoRA expert adapts): every method gives the base
        # back, and skipping it avoids reading and merging what cannot change.
        task = TensorTask(task.name, task.shape, task.out_dtype, task.inputs[:1], True, task.num_layers,
                          task.work_bytes, task.block_rows)
        spec = _IDENTITY
    if grams is not None:
        params.stats = [g.get(task.name, dev) for g in grams]
    if task.block_rows:
        _merge_blocks(task, recipe, spec, dev, writer, pool, params)
        return
    held: list[torch.Tensor] = []
    try:
        if spec.needs_base:
            base = _read_float32(base_src, base_name, dev, pool, held)
        else:  # the method ignores it: a zero view costs nothing
            base = torch.zeros((), dtype=torch.float32, device=dev).expand(task.shape)
        experts = [_read_float32(src, n, dev, pool, held) for src, n in expert_inputs]
        finite = not recipe.output.allow_nonfinite
        if finite:   # each input as it streams by: one isfinite pass over what is in memory
            if spec.needs_base:
                check_finite(base, task.name, "the base")
            for i, ((src, _), e) in enumerate(zip(expert_inputs, experts)):
                check_finite(e, task.name, describe_expert(i, src))
        try:
            out = spec.fn(base, experts, params)
        except RecipeError as exc:
            raise RecipeError(f"{spec.name} on tensor {task.name!r}: {exc.message}", hint=exc.hint) from None
        del base, experts
        if tuple(out.shape) != task.shape:
            raise RuntimeError(f"merge method {spec.name} returned shape {tuple(out.shape)} for "
                               f"{task.name!r}, expected {task.shape}")
        out = _cast_out(out, task, pool, held)
        if finite:   # after the cast: an overflow to float16 counts too
            check_finite(out, task.name, RESULT)
        writer.add(task.name, out)
    finally:
        pool.give(*held)


_IDENTITY = MethodSpec("base", lambda base, experts, p: base, elementwise=True)


def _run(tasks: list[TensorTask], recipe: Recipe, spec: MethodSpec, dev: torch.device,
         writer: ShardedWriter, n_workers: int, budget: int, show: bool, grams: list | None = None) -> None:
    """Merge every task with ``n_workers`` threads, keeping the work in flight under ``budget``."""
    pool = _BufferPool(pinned=dev.type == "cuda")

    def work(task: TensorTask) -> None:
        _merge_one(task, recipe, spec, dev, writer, pool, grams)

    bar = _Progress(len(tasks), sum(t.numel for t in tasks), show)
    pending = deque(tasks)
    inflight: dict = {}
    used = 0
    init = single_torch_thread if dev.type == "cpu" else None
    with bar, ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="mergelab", initializer=init) as pool_exec:
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
