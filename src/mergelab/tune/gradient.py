"""``optimizer: gradient`` — merge coefficients learned by gradient descent on prediction entropy.

AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
arXiv:2310.02575) learns task arithmetic's coefficients — one per task vector per layer — by
minimising the prediction entropy of unlabelled inputs. Here:

* **The coefficients** ``λ`` are the dimensions of the tune section's
  :class:`~mergelab.tune.config.SearchSpace` (default: ``weight`` per expert with one anchor per
  layer, in [0, 1]). Layer lists interpolate and filters pick, so each tensor's method
  parameters are affine in ``λ``; :class:`LinearMerge` reads that map off the recipe machinery
  itself (:func:`~mergelab.recipe.resolve_params` on probe recipes), so it cannot disagree with
  the engine.
* **The merged tensor** is ``W = a·W₀ + Σᵢ cᵢ δᵢ`` with the method's own formula for ``(a, c)``:
  task arithmetic ``cᵢ = λ·wᵢ`` (÷ ``Σw`` with ``normalize``), ``a = 1``; linear ``cᵢ = wᵢ/Σw``,
  ``a = 1`` (``normalize: false``: ``cᵢ = wᵢ``, ``a = Σw``). Other methods are refused.
* **The task vectors** ``δᵢ`` stay LoRA factors ``(scale·Bᵢ, Aᵢ)`` for adapters, and dense
  ``θᵢ − θ₀`` of the tensors that differ for full experts; they come from the
  :class:`~mergelab.merge.inplace.InPlaceMerger` the optuna path uses.
* **The loss** is the ``entropy`` objective's own definition
  (:func:`~mergelab.tune.objective.row_entropies`), mean over rows then over task files, on the
  search part only; the merged weights enter the loaded model through
  :func:`torch.func.functional_call`, so autograd reaches ``λ`` and nothing else.
* **Adam**, full batch (every search row each step, in chunks of the eval ``batch_size`` whose
  gradients add up), ``λ`` clamped to ``[low, high]`` after each step; ``steps`` or
  ``time_limit`` ends it. No sampling: the same inputs give the same coefficients.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from mergelab.evaluate import read_competition_csv
from mergelab.recipe import load_recipe, resolve_params
from mergelab.recipe.schema import as_number
from mergelab.recipe.sections import TuneError
from mergelab.tune.config import SearchSpace
from mergelab.tune.objective import row_entropies

#: the methods whose merged tensor is W₀ plus a combination of task vectors, and their learnable parameters
GRADIENT_METHODS: dict[str, tuple[str, ...]] = {"task_arithmetic": ("weight", "lambda"), "linear": ("weight",)}
DEFAULT_STEPS, DEFAULT_LEARNING_RATE = 50, 0.01


def check_gradient_space(space: SearchSpace, recipe) -> None:
    """Refuse what gradient descent cannot learn exactly: other methods, other parameters, and a
    rank-limited adapter output (its truncation is not the merge the optimiser saw)."""
    valid = ", ".join(GRADIENT_METHODS)
    if space.method not in GRADIENT_METHODS:
        raise TuneError(f"tune.optimizer: gradient learns coefficients the merged tensor is linear in; "
                        f"method {space.method!r} is not such a merge (valid methods: {valid})",
                        hint=f"use optimizer: optuna to tune {space.method}, or method {valid}")
    allowed = GRADIENT_METHODS[space.method]
    for d in space.dims:
        if d.key not in allowed:
            raise TuneError(f"tune.params.{d.key}: optimizer: gradient learns only {' and '.join(allowed)} of "
                            f"{space.method} (valid methods: {valid})", hint="use optimizer: optuna for it")
    if recipe.output.format == "lora" and (recipe.output.rank is not None or recipe.output.energy is not None):
        raise TuneError("tune.optimizer: gradient with output.rank/energy: the rank limit truncates the learned "
                        "merge, so the written adapter would not be the model the optimiser saw",
                        hint="leave output.rank and output.energy out (the linear merge is exact in factors)")


def start_values(space: SearchSpace) -> dict[str, float]:
    """Where the descent starts: the recipe's own value of each coefficient (the method's default 1
    where it sets none, or sets a list), clamped to the dimension's range."""
    out = {}
    for d in space.dims:
        src = space.recipe_data["method"] if d.expert is None else space.recipe_data["experts"][d.expert]
        value = as_number(src.get(d.key)) if not isinstance(src.get(d.key), (list, dict)) else None
        out[d.name] = min(d.high, max(d.low, 1.0 if value is None else float(value)))
    return out


@dataclass
class _Term:
    """One merged tensor: its affine map from λ to the method's parameters, and its task vectors."""

    name: str
    param: torch.Tensor          # the loaded model's tensor
    original: torch.Tensor       # W₀ (float32)
    const: torch.Tensor          # slot values at λ = 0 (float64, slots: weight per expert [, lambda])
    slope: torch.Tensor          # d slot / d λ  (dims × slots, float64)
    normalize: bool
    experts: list[int]           # which expert each factor pair / dense delta belongs to
    B: torch.Tensor | None = None          # LoRA: the experts' scale·B side by side (out × Σ rank)
    A: torch.Tensor | None = None          # LoRA: the experts' A stacked (Σ rank × in)
    ranks: list[int] | None = None
    deltas: list[torch.Tensor] | None = None   # full experts: θᵢ − θ₀


class LinearMerge:
    """The merged weights of a task-arithmetic / linear recipe as a differentiable function of the
    search space's values (see the module doc). Built from an ``InPlaceMerger`` of the same recipe;
    for full experts it takes the merger's expert tensors over (as task vectors), so the merger
    can only :meth:`~mergelab.merge.inplace.InPlaceMerger.restore` afterwards."""

    def __init__(self, space: SearchSpace, root: Path | None, merger, model):
        self.space, self.model = space, model
        self.names = space.names
        n = space.n_experts
        ta = space.method == "task_arithmetic"
        zero = {d: 0.0 for d in self.names}
        probes = [load_recipe(space.recipe_dict({**zero, **({d: 1.0} if d else {})}), base_dir=root)
                  for d in [None, *self.names]]
        self.terms: list[_Term] = []
        self.low = torch.tensor([d.low for d in space.dims], dtype=torch.float64)
        self.high = torch.tensor([d.high for d in space.dims], dtype=torch.float64)
        for t in merger.targets:
            rows = []
            for r in probes:
                p = resolve_params(r, t.name, t.num_layers)
                rows.append([float(w) for w in p.per_expert("weight", 1.0)] + ([float(p.get("lambda", 1.0))] if ta else []))
            v = torch.tensor(rows, dtype=torch.float64)
            normalize = bool(resolve_params(probes[0], t.name, t.num_layers).get("normalize", not ta))
            term = _Term(t.name, t.param, t.original, v[0], v[1:] - v[0], normalize, [])
            if merger.mode == "lora":
                parts = [(i, q) for i, q in enumerate(merger.parts[t.name]) if q is not None]
                term.experts = [i for i, _ in parts]
                term.B = torch.cat([q.B for _, q in parts], 1)
                term.A = torch.cat([q.A for _, q in parts], 0)
                term.ranks = [q.B.shape[1] for _, q in parts]
            else:
                inputs = merger.inputs.pop(t.name)
                deltas = [(i, x.sub_(t.original)) for i, x in enumerate(inputs)]
                deltas = [(i, x) for i, x in deltas if x.any()]
                if not deltas and (ta or normalize):   # every expert equals the base here: W = W₀
                    continue
                term.experts, term.deltas = [i for i, _ in deltas], [x for _, x in deltas]
            self.terms.append(term)
        self.n_experts, self.ta = n, ta

    def coefficients(self, term: _Term, lam: torch.Tensor):
        """``(a, c)`` of ``W = a·W₀ + Σᵢ cᵢ δᵢ`` at ``lam`` (``c``: one per expert)."""
        v = term.const + lam @ term.slope
        w = v[:self.n_experts]
        total = w.sum()
        if self.ta:
            scale = v[self.n_experts] / total if term.normalize and abs(float(total)) >= 1e-8 else v[self.n_experts]
            return 1.0, scale * w
        if not term.normalize:
            return total, w
        if abs(float(total)) < 1e-12:
            raise TuneError(f"linear: the expert weights of {term.name} sum to zero, so they cannot be normalized",
                            hint="raise tune.params.weight.low above 0, or set normalize: false")
        return 1.0, w / total

    def weights(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{tensor name: merged weight}`` at ``lam`` (autograd flows into ``lam`` when it requires grad)."""
        out = {}
        for term in self.terms:
            work = torch.float64 if term.param.dtype == torch.float64 else torch.float32
            a, c = self.coefficients(term, lam)     # λ lives on the CPU, the weights on the model's device
            w0 = term.original.to(work)
            c = c.to(w0.device, work)
            merged = w0 * (a.to(w0.device, work) if torch.is_tensor(a) else a)
            if term.B is not None:
                cols = torch.cat([c[i].expand(r) for i, r in zip(term.experts, term.ranks)])
                merged = merged + (term.B.to(work) * cols) @ term.A.to(work)
            else:
                for i, d in zip(term.experts, term.deltas):
                    merged = merged + c[i] * d.to(work)
            out[term.name] = merged.to(term.param.dtype)
        return out

    def vector(self, values: Mapping[str, float]) -> torch.Tensor:
        return torch.tensor([float(values[n]) for n in self.names], dtype=torch.float64)

    def merged_model(self, lam: torch.Tensor) -> "MergedModel":
        """The loaded model with the merged weights at ``lam`` substituted (nothing written)."""
        return MergedModel(self.model, self.weights(lam))

    @torch.no_grad()
    def write(self, values: Mapping[str, float]) -> None:
        """Write the merge at ``values`` into the loaded model (for scoring it)."""
        for term, w in zip(self.terms, self.weights(self.vector(values)).values()):
            term.param.copy_(w)


class MergedModel:
    """The model with some weights replaced, for one forward pass at a time
    (:func:`torch.func.functional_call`); every other attribute is the model's."""

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        self._model, self._weights = model, weights

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self._model, self._weights, args, kwargs)


def entropy_loss(merge: LinearMerge, tokenizer, tasks: Sequence[Sequence], options, lam: torch.Tensor,
                 backward: bool = True) -> float:
    """The mean over task files of the mean row entropy at ``lam``; with ``backward`` its gradient
    is added to ``lam.grad`` chunk by chunk (``options.batch_size`` rows at a time)."""
    total = 0.0
    for rows in tasks:
        for i in range(0, len(rows), max(1, options.batch_size)):
            with torch.set_grad_enabled(backward):   # the same definition with and without the gradient
                h = row_entropies(merge.merged_model(lam), tokenizer, rows[i:i + options.batch_size], options,
                                  differentiable=True)
                part = h.sum() / (len(rows) * len(tasks))
            if backward:
                part.backward()
            total += float(part.detach())
    return total


def learn(merge: LinearMerge, tokenizer, files: Sequence[Path], options, start: Mapping[str, float], *,
          steps: int, learning_rate: float, time_limit: float | None = None,
          say: Callable[[str], None] = lambda m: None) -> tuple[dict[str, float], list[float], str]:
    """Adam on the entropy of the rows of ``files`` from ``start``; returns the final values (not
    rounded), the loss at the start of each step, and what stopped it (``steps``, ``time_limit``,
    ``interrupted``)."""
    model = merge.model
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)      # autograd reaches λ only
    tasks = [read_competition_csv(f) for f in files]
    lam = merge.vector(start).requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=learning_rate)
    trajectory: list[float] = []
    stopped_by, t0 = "steps", time.monotonic()
    try:
        for step in range(steps):
            if time_limit is not None and time.monotonic() - t0 >= time_limit:
                stopped_by = "time_limit"
                break
            opt.zero_grad()
            loss = entropy_loss(merge, tokenizer, tasks, options, lam)
            trajectory.append(loss)
            opt.step()
            with torch.no_grad():
                lam.copy_(torch.maximum(torch.minimum(lam, merge.high), merge.low))
            say(f"step {step:>3}  entropy {loss:.5f}  |grad| {float(lam.grad.norm()):.2e}")
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        say("interrupted: writing the coefficients so far")
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return {n: float(v) for n, v in zip(merge.names, lam.detach())}, trajectory, stopped_by


__all__ = ["GRADIENT_METHODS", "LinearMerge", "MergedModel", "check_gradient_space", "entropy_loss", "learn",
           "start_values"]
