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
  them from :mod:`mergelab.merge.statistics`.
* Inputs arrive in float32 on the compute device; the method returns float32 of the same shape.
* No I/O, no globals, no device moves. The docstring states the formula and the paper.
* Register with :func:`register`; adding a method = one function + one decorator + one test.
  A method that also has a form on LoRA factors declares it in the same call (``factors=`` for an
  exact low-rank result, ``from_factors=`` for a dense result computed from the factors); the
  adapter path (:mod:`mergelab.merge.adapter`) picks the cheapest exact route from these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from mergelab.errors import RecipeError

MergeFn = Callable[[torch.Tensor, Sequence[torch.Tensor], "MethodParams"], torch.Tensor]
#: the factor form of a method: ``fn(parts, p, shape) -> LowRank``, ``parts[i]`` being expert i's
#: ΔWᵢ as :class:`~mergelab.methods.lowrank.LowRank` factors (None: the expert lacks the module)
FactorFn = Callable[[Sequence[Any], "MethodParams", tuple], Any]
#: a dense result computed from the experts' factors block by block (or None: use the dense form):
#: ``fn(parts, p, shape, device, exact_cut=True) -> Tensor | None``
FromFactorsFn = Callable[..., "torch.Tensor | None"]


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
    expert_params: tuple[str, ...] = ()
    global_params: tuple[str, ...] = ()
    #: exact factor form for LoRA experts (cat, tsv, iso_c, knots, regmean): the merged ΔW as factors
    factors: FactorFn | None = None
    #: the dense result computed from the factors in row blocks without forming each ΔWᵢ (ties)
    from_factors: FromFactorsFn | None = None

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
