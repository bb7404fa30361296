"""L1 — merge methods: pure tensor functions (dense and LoRA-factor forms) and their one registry.

The contract (shared by the full-model engine and the LoRA path):

* A method is a function ``fn(base, experts, p) -> Tensor``:
  ``base`` is the base tensor (a zero tensor when the caller merges task vectors directly, as the
  LoRA path does in ΔW space), ``experts`` is a list of expert tensors of the same shape (full
  weights, *not* task vectors: a method that wants task vectors computes ``e - base``), and ``p``
  is a :class:`MethodParams` giving the hyper-parameters for this one tensor (already resolved
  for its layer and module) and a ``torch.Generator`` seeded from (recipe seed, tensor name).
  A data-aware method (``needs_gram=True``, e.g. RegMean) also finds in ``p.stats`` one input
  Gram matrix per expert for a linear layer's weight (None for other tensors); the callers get
  them from :mod:`mergelab.merge.statistics` — measured on each expert's own model, or, for a
  method registered with ``merged_stats=True`` (RegMean++), in the merged model's forward pass
  layer by layer (:mod:`mergelab.merge.merged_stats`).
* Inputs arrive in float32 on the compute device; the method returns float32 of the same shape.
* No I/O, no globals, no device moves. The docstring states the formula and the paper.
* Register with :func:`register`; adding a method = one function + one decorator + one test.
* Tensors larger than memory: a method whose result is elementwise (``elementwise=True``) is
  simply called on row blocks. A method that needs whole-tensor statistics declares a
  :class:`Blockwise` form (``blockwise=``): ``stats`` reads the tensor in one or more passes over
  its row blocks and returns what the blocks share (norms, a magnitude cut, random states),
  ``apply`` maps one block to its merged block. The engine owns the passes and the reading
  (:mod:`mergelab.merge.full`); the method's plain function is the same two steps over one block
  (:func:`run_whole`), so the merged bytes do not depend on the block size.
  A method that also has a form on LoRA factors declares it in the same call (``factors=`` for an
  exact low-rank result, ``from_factors=`` for a dense result computed from the factors); the
  adapter path (:mod:`mergelab.merge.adapter`) picks the cheapest exact route from these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from mergelab.errors import RecipeError

MergeFn = Callable[[torch.Tensor, Sequence[torch.Tensor], "MethodParams"], torch.Tensor]
#: the factor form of a method: ``fn(parts, p, shape) -> LowRank``, ``parts[i]`` being expert i's
#: ΔWᵢ as :class:`~mergelab.methods.lowrank.LowRank` factors (None: the expert lacks the module)
FactorFn = Callable[[Sequence[Any], "MethodParams", tuple], Any]
#: a dense result computed from the experts' factors block by block (or None: use the dense form):
#: ``fn(parts, p, shape, device, exact_cut=True) -> Tensor | None``
FromFactorsFn = Callable[..., "torch.Tensor | None"]


#: elements per reduction chunk: a method sums whole-tensor statistics chunk by chunk in this order,
#: and the engine's row blocks start at multiples of it, so a sum is the same whatever the blocks
CHUNK = 1 << 17
GPU_CHUNK = 1 << 24


def chunk_size(device: torch.device) -> int:
    """Reduction chunk of the flattened tensor on ``device``: small on the CPU (cache), large on an accelerator."""
    return CHUNK if device.type == "cpu" else GPU_CHUNK


def chunks(n: int, device: torch.device) -> Iterator[slice]:
    """Slices of ``chunk_size(device)`` elements covering ``range(n)``, in order."""
    step = chunk_size(device)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def row_chunks(n_rows: int, cols: int, device: torch.device) -> Iterator[slice]:
    """Slices of rows covering ``range(n_rows)``, each (but the last) the fewest whole rows that
    hold a multiple of :func:`chunk_size` elements: the unit the engine's row blocks are made of.

    A method whose block rule is a matrix product or a solve over rows runs it on these slices of
    its block, so the whole tensor and any row blocks of it run the very same kernels on the very
    same rows (a BLAS kernel's rounding may depend on how many rows it is given).
    """
    step = chunk_size(device) // math.gcd(max(cols, 1), chunk_size(device))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


@dataclass
class Block:
    """Rows ``[row, row + len)`` of one tensor's inputs (float32, the tensor's trailing shape).

    ``start`` is the flat index of the block's first element; every block but the last holds a
    multiple of :func:`chunk_size` elements, so chunked sums line up with the whole tensor's.
    """

    start: int
    base: torch.Tensor
    experts: list[torch.Tensor]
    shape: tuple[int, ...]        # the whole tensor's shape

    @property
    def numel(self) -> int:
        return self.base.numel()


#: entries in the sample a selection brackets its cut with (:attr:`Passes.sample`)
SAMPLE = 1 << 16


def sample_rows(n_rows: int, cols: int) -> list[int]:
    """The rows a tensor's sample is taken from: about :data:`SAMPLE` entries, evenly spread."""
    m = min(n_rows, max(1, SAMPLE // max(cols, 1)))
    return [(2 * i + 1) * n_rows // (2 * m) for i in range(m)]


@dataclass(frozen=True)
class Passes:
    """A tensor's inputs as a stats function sees them: call it for one pass over the blocks, in
    order (as many passes as the statistics need); ``n_experts`` says how many experts there are.
    ``sample()`` (when not None) gives a block of the rows :func:`sample_rows` names, read without
    a pass: a selection brackets its cut with it, which decides its speed, never its result."""

    read: Callable[[], Iterable[Block]]
    n_experts: int
    sample: Callable[[], Block] | None = None
    device: torch.device = torch.device("cpu")
    #: ``(start, numel)`` of every block, in order, known without reading (None: make a pass)
    layout: list[tuple[int, int]] | None = None

    def blocks(self) -> list[tuple[int, int]]:
        """``(start, numel)`` of every block, in order."""
        return self.layout if self.layout is not None else [(b.start, b.numel) for b in self.read()]

    def __call__(self) -> Iterable[Block]:
        return self.read()


@dataclass(frozen=True)
class Blockwise:
    """A method's form over row blocks: whole-tensor ``stats``, then a per-block ``apply``.

    ``stats(passes, p, shape)`` computes what every block needs from the whole tensor, reading it
    through ``passes()`` (one call, one pass; the blocks arrive in order); ``apply(block, st, p)``
    returns the merged block (float32, the block's shape). ``apply`` is called once per block in
    order and may update ``st`` (e.g. a count carried from block to block).
    """

    stats: Callable[[Passes, "MethodParams", tuple], Any]
    apply: Callable[[Block, Any, "MethodParams"], torch.Tensor]
    #: ``only_if(params, shape)``: for parameters or shapes under which blocks of whole rows do
    #: not suffice or do not pay (e.g. a per-column statistic), False: the engine then merges the
    #: tensor whole
    only_if: Callable[["MethodParams", tuple], bool] | None = None


def run_whole(form: Blockwise, base: torch.Tensor, experts: Sequence[torch.Tensor], p: "MethodParams") -> torch.Tensor:
    """A :class:`Blockwise` method on a whole tensor: its two steps over one block."""
    block = Block(0, base, list(experts), tuple(base.shape))

    def sample() -> Block:
        rows = torch.tensor(sample_rows(base.shape[0], math.prod(base.shape[1:])), device=base.device)
        return Block(-1, base.index_select(0, rows), [e.index_select(0, rows) for e in experts], tuple(base.shape))

    passes = Passes(lambda: (block,), len(block.experts), sample if base.dim() >= 2 else None, base.device,
                    [(0, base.numel())])
    return form.apply(block, form.stats(passes, p, tuple(base.shape)), p)


@dataclass
class MethodParams:
    """Hyper-parameters of one method call, resolved for one tensor."""

    globals: dict[str, Any] = field(default_factory=dict)
    experts: list[dict[str, Any]] = field(default_factory=list)
    generator: torch.Generator | None = None
    #: per-expert data statistics of this tensor (input Gram matrices, float32 on the compute
    #: device) for methods registered with ``needs_gram``; None when the tensor has none
    stats: list[torch.Tensor | None] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """A global parameter (``lambda``, ``normalize``, ``t``, ...)."""
        return self.globals.get(key, default)

    def per_expert(self, key: str, default: Any = None) -> list[Any]:
        """One value per expert: the expert's own, else the global one, else ``default``."""
        fallback = self.globals.get(key, default)
        return [e.get(key, fallback) for e in self.experts]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MergeFn
    random: bool = False            # draws from p.generator (DARE, DELLA, ...)
    linear_in_delta: bool = False   # result - base is a fixed linear combination of task vectors
    needs_base: bool = True         # False when the base takes no part (linear, as in mergekit)
    n_experts: tuple[int, int | None] = (1, None)  # min, max number of experts
    needs_gram: bool = False        # reads each expert's input Gram matrices from p.stats (RegMean)
    #: the Gram matrices are measured in the merged model's forward pass, layer by layer (RegMean++):
    #: they depend on the merge's own parameters (False: each expert's own model)
    merged_stats: bool = False
    expert_params: tuple[str, ...] = ()
    global_params: tuple[str, ...] = ()
    #: exact factor form for LoRA experts (cat, tsv, iso_c, knots, regmean): the merged ΔW as factors
    factors: FactorFn | None = None
    #: the dense result computed from the factors in row blocks without forming each ΔWᵢ (ties)
    from_factors: FromFactorsFn | None = None
    #: the result of an entry depends only on the inputs at that entry: row blocks merge alone
    elementwise: bool = False
    #: whole-tensor statistics + a per-block rule, for tensors merged in row blocks
    blockwise: Blockwise | None = None

    @property
    def blocks(self) -> bool:
        """Whether the engine may merge a tensor of this method in row blocks."""
        return self.elementwise or self.blockwise is not None

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, **kwargs: Any) -> Callable[[MergeFn], MergeFn]:
    """Decorator: ``@register("ties", expert_params=("weight", "density"))``."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        REGISTRY[name] = MethodSpec(name=name, fn=fn, **kwargs)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``, or a :class:`RecipeError` listing the known ones."""
    _load_builtin_methods()
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise RecipeError(f"unknown merge method {name!r}", hint=f"choose one of: {known}") from None


def _load_builtin_methods() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
