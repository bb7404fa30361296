"""Input statistics measured in the merged model's forward pass, layer by layer (RegMean++).

RegMean (:mod:`mergelab.merge.statistics`) takes expert ``i``'s Gram matrices at layer ``l`` from
expert ``i``'s own model: the inputs its own layers ``< l`` make. In the merged model, layer ``l``
is fed by the *merged* layers ``< l``. RegMean++ (Nguyen et al., 2025, arXiv:2508.03121) measures
them there, so the layers are merged one after another (:func:`merged_grams`):

1. every tensor outside the layers (embeddings, final norms) is merged with the recipe's method
   (it has no statistics: the weighted mean of the task vectors, as the merge writes it) into one
   working copy of the base model;
2. for each layer ``l`` in the order the forward pass runs them, for each expert ``i``: expert
   ``i``'s own layer ``l`` is put in the working model and run on ``Xᵢ⁽ˡ⁾``, what the merged
   embeddings and merged layers ``< l`` make of expert ``i``'s rows; pre-forward hooks accumulate
   ``Gᵢ`` for the layer's linear modules exactly as :func:`~mergelab.merge.statistics.measure_grams`
   does (mean over real tokens, modules fed the same tensor share one matrix). So a module inside
   the layer (``o_proj``, ``down_proj``) sees what expert ``i``'s own earlier modules of that layer
   make of the merged stream. Then layer ``l`` is merged with the method and these matrices — the
   same parameters (:func:`~mergelab.recipe.resolve_params`), the same float32 matrices, cast to
   the output dtype, as the merge engine will compute them — and written into the working model;
3. linear layers after the layers (an untied output head) are measured in the forward pass of the
   whole merged model.

Layer 0 is fed by the merged embeddings, so with LoRA experts (which leave them alone) its
statistics are RegMean's; with full fine-tunes they differ from RegMean's by the embeddings.

How each layer's inputs are obtained (both give the same matrices; ``mode`` forces one):

``cached`` (decoder-only models: Llama, Mistral, Qwen, Gemma, …)
    One forward pass per expert (before any layer is merged) records layer 0's input and the
    other arguments of every layer (masks, position embeddings: they do not depend on the
    weights) for each batch; then each layer runs alone on the cached hidden states — expert
    ``i``'s layer for the statistics, the merged layer to advance the cache to the next layer:
    ``2L`` layer passes per expert. Memory: every expert's hidden states,
    ``rows × tokens × hidden × bytes``, on the device when they fit a quarter of its free memory,
    else on the CPU. Chosen when one probe pass shows that the layers form one chain (each layer's
    input is the previous one's output, no layer argument comes from another layer's output).
``rerun`` (encoder–decoder models such as T5, whose decoder reads the whole encoder and whose
    later layers take a position bias computed by the first; or hidden states too large)
    For each layer with measured modules, the working model runs from its start on each batch
    and stops right after that layer: ``L(L+1)/2`` layer passes per expert (``O(L²)``), no
    hidden states held.

The matrices are cached like RegMean's (:func:`~mergelab.merge.statistics.cache_key` with a
:class:`~mergelab.merge.statistics.MergeContext`): one file per expert whose key covers the whole
merge — method and parameters, every expert and its data, the output dtype, the seed — since any
of them changes every layer's inputs but the first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from mergelab.evaluate.loading import load_model_and_tokenizer
from mergelab.merge.inputs import TensorTask, align_tensors, open_inputs
from mergelab.merge.statistics import (GramAccumulator, GramError, GramOptions, GramSet, MergeContext, batches,
                                       cache_key, forward_batch, gram_cache_dir, gram_options, input_stamps,
                                       linear_targets, measures_head, prompt_ids, read_inputs)
from mergelab.methods import MethodSpec, get_method
from mergelab.recipe import layer_module, resolve_params
from mergelab.util import available_memory

MODES = ("auto", "cached", "rerun")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the measured layer has run."""


@dataclass
class _Layer:
    """One layer of the working model: its tensors and its measured linear modules."""

    name: str                                               # "model.layers.3"
    module: torch.nn.Module
    tensors: list[tuple[TensorTask, torch.Tensor]] = field(default_factory=list)   # task, working tensor
    targets: dict[str, torch.nn.Module] = field(default_factory=dict)             # weight name → nn.Linear


@dataclass
class _Batch:
    """One batch of one expert's rows, as the cached mode keeps it between layers."""

    mask: torch.Tensor
    hidden: torch.Tensor                       # the input of the next layer to run
    calls: list[tuple[tuple, dict]]            # per layer (in order): its other arguments


def merge_context(recipe, experts: Sequence[Path], index: int, stamps: tuple | None = None) -> MergeContext:
    """The part of expert ``index``'s cache key that says its statistics come from this merge
    (``stamps``: :func:`~mergelab.merge.statistics.input_stamps` of the experts, if already computed)."""
    if stamps is None:
        stamps = input_stamps(experts, [e.data for e in recipe.experts])
    return MergeContext(method=recipe.method.name, params=dict(recipe.method.params), inputs=stamps,
                        expert_params=tuple(dict(e.params) for e in recipe.experts),
                        out_dtype=recipe.output.dtype, seed=int(recipe.seed), index=index)


def merged_grams(recipe, base: Path, experts: Sequence[Path], *, names: Iterable[str] | None,
                 device: torch.device | str = "cpu", cache: bool = True, mode: str = "auto",
                 say: Callable[[str], None] | None = None) -> list[GramSet]:
    """Each expert's :class:`GramSet` measured in the merged model's forward pass (module doc).

    ``names``: the weight names wanted (None: every linear layer). ``mode``: ``auto`` (cached
    hidden states when the layers form one chain, else reruns), ``cached`` or ``rerun``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    base, experts = Path(base), [Path(e) for e in experts]
    names = None if names is None else sorted(set(names))
    options, eval_options = gram_options(recipe)
    data = [list(e.data) for e in recipe.experts]
    stamps = input_stamps(experts, data)
    keys = [cache_key(base, e, d, names, options, eval_options, device, merged=merge_context(recipe, experts, i, stamps))
            for i, (e, d) in enumerate(zip(experts, data))]
    files = [gram_cache_dir() / f"{k}.safetensors" for k in keys]
    if cache and all(f.is_file() for f in files):
        return [GramSet.load(f) for f in files]

    spec = get_method(recipe.method.name)
    rows = [read_inputs([Path(f) for f in d], options.rows) for d in data]
    model, tokenizer = load_model_and_tokenizer(base, device=device.type, dtype="float32" if device.type == "cpu" else None)
    need = len(experts) * sum(m.in_features ** 2 * 4 for m in linear_targets(model, names).values())
    have = available_memory(torch.device("cpu"))
    if need > 0.5 * have:   # every expert's float32 matrices are held until the end of the pass
        raise GramError(f"the input statistics of the merged linear layers of {len(experts)} experts take "
                        f"{need / 2**30:.1f} GiB, but only {have / 2**30:.1f} GiB of memory is free",
                        hint="merge LoRA experts (only their adapted layers are measured) or use fewer experts")
    opened: list = []
    try:
        base_reader, sources = open_inputs(base, experts, opened)
        tasks = align_tensors(recipe, base_reader, sources, spec)
        ids = [prompt_ids(model, tokenizer, r, options, eval_options) for r in rows]
        out = _MergedPass(recipe, spec, model, tokenizer, tasks, names, options, say).run(ids, mode)
    finally:
        for src in opened:
            if hasattr(src, "close"):
                src.close()
    if cache:
        for gs, f in zip(out, files):
            gs.save(f)
    return out


class _MergedPass:
    """The layer-by-layer pass over one working model (see the module doc)."""

    def __init__(self, recipe, spec: MethodSpec, model, tokenizer, tasks: list[TensorTask],
                 names: Sequence[str] | None, options: GramOptions, say: Callable[[str], None] | None):
        self.recipe, self.spec, self.model, self.tokenizer = recipe, spec, model, tokenizer
        self.options, self.say = options, say
        self.device = next(model.parameters()).device
        self.n = len(tasks[0].inputs) - 1 if tasks else 0
        tensors = model.state_dict(keep_vars=True)
        targets = linear_targets(model, names)
        if not targets:
            raise GramError("none of the tensors this merge changes is a linear layer the model runs",
                            hint="data-aware merging applies to linear layers (nn.Linear) only")
        self.layers: dict[str, _Layer] = {}
        self.outer: list[tuple[TensorTask, torch.Tensor]] = []
        for t in tasks:
            w = tensors.get(t.name)
            if not t.floating or w is None:
                continue
            name = layer_module(t.name)
            if name is None:
                self.outer.append((t, w))
            else:
                if name not in self.layers:
                    self.layers[name] = _Layer(name, model.get_submodule(name))
                self.layers[name].tensors.append((t, w))
        for layer in self.layers.values():   # every weight of a layer must be read from the inputs by its name
            have = {t.name for t, _ in layer.tensors}
            missing = sorted(f"{layer.name}.{p}" for p, _ in layer.module.named_parameters()
                             if f"{layer.name}.{p}" not in have)
            if missing:
                raise GramError(f"regmean_pp: the loaded model's tensor {missing[0]!r} is not a tensor of the "
                                "checkpoint under that name, so the layer cannot be rebuilt from the experts",
                                hint="this architecture is not supported by regmean_pp; use regmean")
        self.rest: dict[str, torch.nn.Module] = {}
        for wname, mod in targets.items():
            name = layer_module(wname)
            if name in self.layers:
                self.layers[name].targets[wname] = mod
            else:
                self.rest[wname] = mod

    # --- tensors
    def _fixed(self, task: TensorTask) -> bool:
        """Every expert is a LoRA adapter that leaves this tensor alone: it stays the base's."""
        return all(hasattr(src, "changes") and not src.changes(n) for src, n in task.inputs[1:])

    @torch.no_grad()
    def _merge(self, task: TensorTask, w: torch.Tensor, stats: list[GramSet] | None) -> None:
        """Write the merge of one tensor (as the engine computes it) into the working tensor ``w``."""
        if self._fixed(task):   # the base's, as loaded (no expert's value is ever written there)
            return
        (src0, n0), inputs = task.inputs[0], task.inputs[1:]
        base = src0.get(n0).to(self.device, torch.float32)
        experts = [src.get(n).to(self.device, torch.float32) for src, n in inputs]
        params = resolve_params(self.recipe, task.name, task.num_layers)
        if stats is not None:
            params.stats = [g.get(task.name, self.device) for g in stats]
        out = self.spec.fn(base, experts, params)
        w.copy_(out.to(task.out_dtype).to(w.dtype))

    @torch.no_grad()
    def _load_expert(self, layer: _Layer, i: int) -> None:
        """Put expert ``i``'s own tensors in ``layer``."""
        for task, w in layer.tensors:
            if not self._fixed(task):
                src, n = task.inputs[1 + i]
                w.copy_(src.get(n).to(w.device, w.dtype))

    def _merge_layer(self, layer: _Layer, stats: list[GramSet] | None) -> None:
        for task, w in layer.tensors:
            self._merge(task, w, stats)

    # --- the pass
    @torch.no_grad()
    def run(self, ids: list[list[list[int]]], mode: str) -> list[GramSet]:
        rest = set(self.rest)
        for task, w in self.outer:   # what feeds layer 0 (the measured head's own weight does not matter)
            if task.name not in rest:
                self._merge(task, w, None)
        order, chain = self._probe(ids[0][: self.options.batch_size])
        if mode == "cached" and not chain:
            raise GramError("regmean_pp: the layers of this model do not form one chain; the cached mode "
                            "cannot run it", hint="use mode 'auto' or 'rerun'")
        cached = mode == "cached" or (mode == "auto" and chain)
        store = self._store(ids) if cached else None
        if cached and store is None:
            cached = False
        if mode == "cached" and not cached:
            raise GramError("regmean_pp: the hidden states of every expert's rows do not fit in memory",
                            hint="give fewer rows, or use mode 'auto'")
        if self.say:
            self.say(f"regmean_pp: measuring the input statistics of {self.n} experts in the merged model, layer "
                     f"by layer ({len(order)} layers, " + ("on cached hidden states)" if cached else
                                                           "each from the model's first layer)"))
        per_expert: list[list[GramSet]] = [[] for _ in range(self.n)]
        if cached:
            self._cached(order, ids, store, per_expert)
        else:
            self._rerun(order, ids, per_expert)
        if self.rest:
            if self.say:
                self.say(f"regmean_pp: measuring {len(self.rest)} linear layer(s) after the last layer (an output head) "
                         "in the whole merged model")
            whole = measures_head(self.model, self.rest)
            for i in range(self.n):
                acc = GramAccumulator(self.rest)
                try:
                    for x, mask in batches(self.model, self.tokenizer, ids[i], self.options.batch_size):
                        acc.start_batch(mask)
                        forward_batch(self.model, x, mask, whole_head=whole)
                finally:
                    acc.close()
                per_expert[i].append(acc.result())
        return [_join(sets) for sets in per_expert]

    def _probe(self, ids: list[list[int]]) -> tuple[list[_Layer], bool]:
        """The layers in the order one forward pass runs them, and whether they form one chain."""
        seq: list[str] = []
        last: dict[str, Any] = {"out": None}
        produced: list[torch.Tensor] = []   # tensors a layer returned besides its hidden states (kept alive)
        chain = [True]
        early: list[str] = []

        def pre(name):
            def hook(mod, args, kwargs):
                hidden = args[0] if args else kwargs.get("hidden_states")
                if seq and hidden is not last["out"]:
                    chain[0] = False
                others = [*args[1:], *(v for k, v in kwargs.items() if k != "hidden_states")]
                flat = [t for v in others for t in (v if isinstance(v, (tuple, list)) else (v,))]
                if any(t is p for t in flat if isinstance(t, torch.Tensor) for p in produced):
                    chain[0] = False
                seq.append(name)
            return hook

        def post(mod, args, kwargs, out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            last["out"] = outs[0]
            produced.extend(t for t in outs[1:] if isinstance(t, torch.Tensor))

        def before(wname):
            def hook(mod, args):
                if not seq:
                    early.append(wname)
            return hook

        handles = []
        try:
            for name, layer in self.layers.items():
                handles.append(layer.module.register_forward_pre_hook(pre(name), with_kwargs=True))
                handles.append(layer.module.register_forward_hook(post, with_kwargs=True))
            for wname, mod in self.rest.items():
                handles.append(mod.register_forward_pre_hook(before(wname)))
            for x, mask in batches(self.model, self.tokenizer, ids, len(ids)):
                forward_batch(self.model, x, mask, whole_head=False)
        finally:
            for h in handles:
                h.remove()
        if early:
            raise GramError(f"regmean_pp: the linear layer {early[0]!r} runs before the model's layers, so its "
                            "merge would have to come first; this architecture is not supported",
                            hint="use regmean")
        if len(seq) != len(set(seq)):
            chain[0] = False
        return [self.layers[n] for n in dict.fromkeys(seq)], chain[0]

    def _store(self, ids: list[list[list[int]]]) -> str | None:
        """Where the cached hidden states go (the device or the CPU), or None when they fit neither."""
        hidden = int(getattr(self.model.config, "hidden_size", 0) or self.model.get_input_embeddings().weight.shape[1])
        item = next(self.model.parameters()).element_size()
        size = 0
        for expert_ids in ids:
            bs = self.options.batch_size
            for s in range(0, len(expert_ids), bs):
                chunk = expert_ids[s:s + bs]
                size += len(chunk) * max((len(c) for c in chunk), default=0) * hidden * item
        if self.device.type != "cpu" and size <= 0.25 * available_memory(self.device):
            return "device"
        if size <= 0.5 * available_memory(torch.device("cpu")):
            return "cpu"
        return None

    def _cached(self, order: list[_Layer], ids, store: str, per_expert: list[list[GramSet]]) -> None:
        where = self.device if store == "device" else torch.device("cpu")
        streams = [self._capture(order, expert_ids, where) for expert_ids in ids]
        for k, layer in enumerate(order):
            stats = None
            if layer.targets:
                stats = []
                for i, stream in enumerate(streams):
                    self._load_expert(layer, i)
                    acc = GramAccumulator(layer.targets)
                    try:
                        for b in stream:
                            acc.start_batch(b.mask)
                            args, kwargs = b.calls[k]
                            layer.module(b.hidden.to(self.device), *args, **kwargs)
                    finally:
                        acc.close()
                    stats.append(acc.result())
                    per_expert[i].append(stats[-1])
            self._merge_layer(layer, stats)
            if k + 1 < len(order):   # the merged layer's outputs are the next layer's inputs
                for stream in streams:
                    for b in stream:
                        args, kwargs = b.calls[k]
                        out = layer.module(b.hidden.to(self.device), *args, **kwargs)
                        b.hidden = (out[0] if isinstance(out, (tuple, list)) else out).to(where)

    def _capture(self, order: list[_Layer], ids: list[list[int]], where: torch.device) -> list[_Batch]:
        """One forward pass over ``ids``: layer 0's input and every layer's other arguments, per batch."""
        out: list[_Batch] = []
        index = {layer.name: k for k, layer in enumerate(order)}
        current: dict[str, Any] = {}

        def pre(name):
            def hook(mod, args, kwargs):
                k = index[name]
                if k == 0:
                    current["hidden"] = (args[0] if args else kwargs["hidden_states"]).to(where)
                current["calls"][k] = (tuple(args[1:]), {a: v for a, v in kwargs.items() if a != "hidden_states"})
                if k == len(order) - 1:
                    raise _Stop
            return hook

        handles = [layer.module.register_forward_pre_hook(pre(layer.name), with_kwargs=True) for layer in order]
        try:
            for x, mask in batches(self.model, self.tokenizer, ids, self.options.batch_size):
                current["calls"] = [None] * len(order)
                try:
                    forward_batch(self.model, x, mask, whole_head=False)
                except _Stop:
                    pass
                out.append(_Batch(mask, current.pop("hidden"), current.pop("calls")))
        finally:
            for h in handles:
                h.remove()
        return out

    def _rerun(self, order: list[_Layer], ids, per_expert: list[list[GramSet]]) -> None:
        for layer in order:
            stats = None
            if layer.targets:
                stats = []

                def stop(mod, args, out):
                    raise _Stop

                handle = layer.module.register_forward_hook(stop)
                try:
                    for i, expert_ids in enumerate(ids):
                        self._load_expert(layer, i)
                        acc = GramAccumulator(layer.targets)
                        try:
                            for x, mask in batches(self.model, self.tokenizer, expert_ids, self.options.batch_size):
                                acc.start_batch(mask)
                                try:
                                    forward_batch(self.model, x, mask, whole_head=False)
                                except _Stop:
                                    pass
                        finally:
                            acc.close()
                        stats.append(acc.result())
                        per_expert[i].append(stats[-1])
                finally:
                    handle.remove()
            self._merge_layer(layer, stats)


def _join(sets: Sequence[GramSet]) -> GramSet:
    """One expert's :class:`GramSet` from its per-layer ones."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for gs in sets:
        tensors.update(gs.tensors)
        aliases.update(gs.aliases)
    return GramSet(tensors, aliases, max((gs.tokens for gs in sets), default=0))

