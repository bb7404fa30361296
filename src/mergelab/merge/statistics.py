"""Input statistics of linear layers for data-aware merges (RegMean's Gram matrices).

For a linear layer ``y = x Wᵀ`` the Gram matrix of its inputs over ``N`` tokens is
``G = Σₜ xₜ xₜᵀ`` (in × in). A data-aware merge needs one per expert, measured on the expert's
*own* model — the base with the expert's LoRA ΔW folded in, or the full fine-tune — over a few
hundred unlabelled inputs of the expert's task (the recipe's ``experts[i].data``).

How they are measured (:func:`measure_grams`):

* the first ``rows`` rows of the expert's data files (in file order) are turned into prompts
  exactly as the evaluation would (the recipe's ``eval:`` options: chat template, few-shot), and
  run through the model in batches of ``batch_size``, truncated to ``max_length`` tokens;
* a pre-forward hook on every wanted ``nn.Linear`` accumulates ``XᵀX`` over the real (not
  padded) tokens in float64; modules fed the very same input tensor one after another (``q``,
  ``k``, ``v``; ``gate``, ``up``) share one matrix, which is measured once;
* what is stored is the mean ``G / N`` in float32 (so experts with longer prompts do not count
  more), one safetensors file per expert.

Only the tensors a merge changes are measured (a LoRA expert set: the adapted modules; full
fine-tunes: every linear layer). Layers that are not ``nn.Linear`` (GPT-2's ``Conv1D``),
embeddings and the output head tied to them get no statistics; the method falls back for them.

Files are cached under ``$MERGELAB_CACHE/gram`` (default ``~/.cache/mergelab/gram``) by a key of
everything they depend on: the base and expert files (path, size, modification time; an adapter's
bytes), the data files' sha256, the options, the device type and the wanted tensors. Statistics
measured in the merged model instead (RegMean++, :mod:`mergelab.merge.merged_stats`, which uses
this module's accumulator, prompts and batches) depend on the whole merge too: their key adds a
:class:`MergeContext` (method, parameters, every expert and its data, output dtype, seed).
The recipe-level entry for the merge paths is :mod:`mergelab.merge.datastats`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from mergelab.errors import MergelabError
from mergelab.evaluate import read_competition_csv, EvalOptions
from mergelab.evaluate.batching import encode_prompt, is_encoder_decoder, model_device, pad_id_of, right_pad, truncate_left
from mergelab.evaluate.prefill import accepts
from mergelab.evaluate.prompting import ShotPool, build_prompt
from mergelab.evaluate.scoring import decoder_start_token
from mergelab.io.adapter import is_adapter_dir
from mergelab.util import sha256_file, cache_root, available_memory
from mergelab.merge.inputs import open_expert
from mergelab.io.checkpoint import CheckpointReader
from mergelab.evaluate.loading import load_model_and_tokenizer

GRAM_FORMAT = 1
#: the version of the merged-model pass (:mod:`mergelab.merge.merged_stats`), part of its cache key
MERGED_FORMAT = 1
DEFAULT_ROWS = 256
DEFAULT_MAX_LENGTH = 512


class GramError(MergelabError):
    """The input statistics cannot be measured (no rows, too large for memory, a missing module)."""


@dataclass(frozen=True)
class GramOptions:
    """How the statistics are measured; part of the cache key."""

    rows: int = DEFAULT_ROWS
    batch_size: int = 16
    max_length: int = DEFAULT_MAX_LENGTH


class GramSet:
    """One expert's Gram matrices: ``get(weight name)`` → float32 (in × in) tensor or None."""

    def __init__(self, tensors: dict[str, torch.Tensor], aliases: dict[str, str], tokens: int):
        self.tensors = tensors
        self.aliases = aliases
        self.tokens = tokens
        self._moved: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, name: str, device: torch.device | str | None = None) -> torch.Tensor | None:
        key = self.aliases.get(name)
        if key is None:
            return None
        g = self.tensors[key]
        if device is None or g.device == torch.device(device):
            return g
        moved = self._moved.get((key, str(device)))
        if moved is None:   # one copy per device, shared by the layers that share the input
            moved = self._moved[(key, str(device))] = g.to(device)
        return moved

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        meta = {"format": str(GRAM_FORMAT), "tokens": str(self.tokens), "aliases": json.dumps(self.aliases)}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "GramSet":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta.get("format") != str(GRAM_FORMAT):
            raise GramError(f"{path}: not a mergelab statistics file of format {GRAM_FORMAT}",
                            hint="delete it; it is recomputed")
        return cls(tensors, json.loads(meta["aliases"]), int(meta["tokens"]))


# ------------------------------------------------------------------------------- measuring


def linear_targets(model, names: Iterable[str] | None) -> dict[str, torch.nn.Module]:
    """``{weight name: nn.Linear}`` of the wanted tensors (all linear layers when ``names`` is None);
    the output head is left out when it shares the input embeddings' weight."""
    wanted = None if names is None else set(names)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    out: dict[str, torch.nn.Module] = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if tied and mod is out_emb:
            continue
        name = f"{mod_name}.weight"
        if wanted is None or name in wanted:
            out[name] = mod
    return out


class GramAccumulator:
    """Pre-forward hooks that sum ``XᵀX`` per distinct input (see the module doc)."""

    def __init__(self, targets: dict[str, torch.nn.Module]):
        self.targets = targets
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.aliases: dict[str, str] = {}   # weight name → key its matrix is stored under
        self.mask: torch.Tensor | None = None
        self._last: tuple[Any, str] | None = None
        self._handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in targets.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            x = args[0]
            if name not in self.aliases:   # first batch: find modules that share their input
                if self._last is not None and self._last[0] is x:
                    self.aliases[name] = self._last[1]
                else:
                    self.aliases[name] = name
            self._last = (x, self.aliases[name])
            if self.aliases[name] != name:
                return None
            flat = x.reshape(-1, x.shape[-1])
            if self.mask is not None and self.mask.numel() == flat.shape[0]:
                flat = flat[self.mask]
            flat = flat.float()
            g = (flat.T @ flat).double()
            if name in self.sums:
                self.sums[name] += g
            else:
                self.sums[name] = g
            self.counts[name] = self.counts.get(name, 0) + flat.shape[0]
            return None
        return hook

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1).bool()
        self._last = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def result(self) -> GramSet:
        tensors = {k: (s / max(self.counts[k], 1)).float().cpu() for k, s in self.sums.items()}
        tokens = max(self.counts.values(), default=0)
        return GramSet(tensors, dict(self.aliases), tokens)


def read_inputs(files: Sequence[Path], rows: int) -> list:
    """The first ``rows`` rows (competition CSV :class:`~mergelab.evaluate.data.Row`) of ``files``."""

    out: list = []
    for f in files:
        if len(out) >= rows:
            break
        out += read_competition_csv(f)[: rows - len(out)]
    if not out:
        raise GramError(f"no data rows in {', '.join(str(f) for f in files)}",
                        hint="give each expert a CSV with unlabelled inputs of its task")
    return out


def prompt_ids(model, tokenizer, rows: Sequence, options: GramOptions, eval_options=None) -> list[list[int]]:
    """The token ids the statistics pass feeds the model for ``rows`` (prompts as the evaluation
    builds them, truncated on the left to ``max_length``)."""

    eval_options = eval_options or EvalOptions()
    pool = ShotPool.from_csv(eval_options.shots, eval_options.few_shot) if eval_options.few_shot else None
    enc_dec = is_encoder_decoder(model)
    special = not eval_options.chat
    max_length = min(eval_options.max_length or options.max_length, options.max_length)
    ids = []
    for r in rows:
        shots = pool.draw(r, eval_options.few_shot, eval_options.seed) if pool else []
        text = build_prompt(r, tokenizer, eval_options, shots)
        ids.append(truncate_left(encode_prompt(tokenizer, text, add_special_tokens=special, encoder_decoder=enc_dec),
                                 max_length, tokenizer.bos_token_id)[0])
    return ids


def batches(model, tokenizer, ids: Sequence[Sequence[int]], batch_size: int):
    """``(input ids, attention mask)`` per batch of ``batch_size`` prompts, right-padded, on the model's device."""
    pad, device = pad_id_of(tokenizer, model), model_device(model)
    for start in range(0, len(ids), batch_size):
        yield right_pad(ids[start:start + batch_size], pad, device)


def forward_batch(model, x: torch.Tensor, mask: torch.Tensor, *, whole_head: bool) -> None:
    """One statistics forward of a batch: no KV cache, an encoder–decoder model gets its decoder's
    start token, and logits of one position only unless ``whole_head`` (the head is measured)."""
    if is_encoder_decoder(model):
        dec = torch.full((x.shape[0], 1), decoder_start_token(model), dtype=torch.long, device=x.device)
        model(input_ids=x, attention_mask=mask, decoder_input_ids=dec, use_cache=False)
        return
    extra = {"logits_to_keep": 1} if not whole_head and accepts(model, "logits_to_keep") else {}
    model(input_ids=x, attention_mask=mask, use_cache=False, **extra)


def measures_head(model, targets: dict[str, torch.nn.Module]) -> bool:
    """Whether the output head is among ``targets`` (then every position's logits are computed)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and any(m is head for m in targets.values())


@torch.no_grad()
def measure_grams(model, tokenizer, rows: Sequence, names: Iterable[str] | None, options: GramOptions,
                  eval_options=None) -> GramSet:
    """The mean input Gram matrices of ``model``'s wanted linear layers over ``rows`` (module doc)."""

    targets = linear_targets(model, names)
    if not targets:
        raise GramError("none of the tensors this merge changes is a linear layer the model runs",
                        hint="data-aware merging applies to linear layers (nn.Linear) only")
    ids = prompt_ids(model, tokenizer, rows, options, eval_options)
    # the statistics need the layers' inputs, not the vocabulary logits: compute one position's
    whole_head = measures_head(model, targets)
    acc = GramAccumulator(targets)
    try:
        for x, mask in batches(model, tokenizer, ids, options.batch_size):
            acc.start_batch(mask)
            forward_batch(model, x, mask, whole_head=whole_head)
    finally:
        acc.close()
    return acc.result()


# ---------------------------------------------------------------------------------- caching


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _folder_stamp(folder: Path, contents: bool) -> list:
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
    if contents:
        return [[p.name, hashlib.sha256(p.read_bytes()).hexdigest()] for p in files]
    return [_file_stamp(p) for p in files]


@dataclass(frozen=True)
class MergeContext:
    """What statistics measured in the merged model's forward pass (``regmean_pp``) depend on
    besides one expert's own inputs: the merge itself — its method and parameters, every expert
    with its data and parameters, the output dtype, the seed — and which expert (``index``) they are of."""

    method: str
    params: Mapping[str, Any]
    inputs: tuple          # every expert's and its data's stamps (:func:`input_stamps`)
    expert_params: tuple[Mapping[str, Any], ...]
    out_dtype: str | None
    seed: int
    index: int


def input_stamps(experts: Sequence[Path], data: Sequence[Sequence[Path]]) -> tuple:
    """What identifies each expert and its data in a cache key: the files' size and time (an
    adapter's bytes) and the data files' sha256 — computed once for the keys of a whole merge."""
    return tuple((_folder_stamp(Path(e), contents=is_adapter_dir(Path(e))), [sha256_file(Path(f)) for f in d])
                 for e, d in zip(experts, data))


def cache_key(base: Path, expert: Path, data: Sequence[Path], names: Iterable[str] | None,
              options: GramOptions, eval_options, device: torch.device, *,
              merged: MergeContext | None = None) -> str:
    """The digest of everything an expert's statistics depend on (see the module doc); with
    ``merged``, of statistics measured in the merged model (they depend on the whole merge)."""

    payload = {
        "format": GRAM_FORMAT,
        "base": _folder_stamp(base, contents=False),
        "expert": _folder_stamp(expert, contents=is_adapter_dir(expert)),
        "data": [sha256_file(Path(f)) for f in data],
        "names": None if names is None else sorted(names),
        "options": [options.rows, options.batch_size, options.max_length],
        "eval": None if eval_options is None else eval_options.model_dump(
            mode="json", include={"chat", "few_shot", "shots", "shot_separator", "seed", "max_length"}),
        "device": device.type,
    }
    if merged is not None:   # only then, so that the keys of each expert's own statistics stay as they were
        payload["merged"] = {
            "pass": "merged model, layer by layer", "format": MERGED_FORMAT, "method": merged.method,
            "params": dict(merged.params), "index": merged.index, "out_dtype": merged.out_dtype, "seed": merged.seed,
            "experts": [[*stamp, dict(p)] for stamp, p in zip(merged.inputs, merged.expert_params)],
        }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def gram_cache_dir() -> Path:
    return cache_root() / "gram"


def _estimate_bytes(model, names: Iterable[str] | None) -> int:
    return sum(mod.in_features ** 2 * 8 for mod in linear_targets(model, names).values())


def expert_grams(base: Path, experts: Sequence[Path], data: Sequence[Sequence[Path]], *,
                 names: Iterable[str] | None, options: GramOptions, eval_options=None,
                 device: torch.device | str = "cpu", cache: bool = True,
                 say: Callable[[str], None] | None = None) -> list[GramSet]:
    """Each expert's :class:`GramSet`, from the cache or measured (the base is loaded once).

    A LoRA expert is measured on the base with its ΔW added in place (then taken out again); a
    full expert is loaded on its own. ``names``: the weight names wanted (None: every linear layer).
    """

    device = torch.device(device)
    names = None if names is None else sorted(set(names))
    keys = [cache_key(Path(base), Path(e), d, names, options, eval_options, device) for e, d in zip(experts, data)]
    out: list[GramSet | None] = [None] * len(experts)
    for i, k in enumerate(keys):
        f = gram_cache_dir() / f"{k}.safetensors"
        if cache and f.is_file():
            out[i] = GramSet.load(f)
    todo = [i for i, g in enumerate(out) if g is None]
    if not todo:
        return out  # type: ignore[return-value]
    dtype = "float32" if device.type == "cpu" else None
    model, tokenizer = load_model_and_tokenizer(base, device=device.type, dtype=dtype)
    need = _estimate_bytes(model, names)

    have = available_memory(device)
    if need > 0.5 * have:
        raise GramError(f"the input statistics of the merged linear layers take {need / 2**30:.1f} GiB "
                        f"while measuring, but only {have / 2**30:.1f} GiB is free on {device}",
                        hint="merge LoRA experts (only their adapted layers are measured) or use a device "
                             "with more memory")
    params = model.state_dict(keep_vars=True)
    reader = CheckpointReader(base)
    try:
        for i in todo:
            if say:
                say(f"measuring input statistics of expert {i + 1}/{len(experts)} "
                    f"({options.rows} rows of {', '.join(Path(f).name for f in data[i])})")
            rows = read_inputs([Path(f) for f in data[i]], options.rows)
            if is_adapter_dir(experts[i]):
                src = open_expert(experts[i], reader)
                saved = {}
                try:
                    for name in src.modules:
                        p = params.get(name)
                        if p is None:
                            raise GramError(f"{experts[i]}: the loaded base has no tensor {name!r}, which the "
                                            "adapter changes")
                        saved[name] = p.detach().clone()
                        p.data.add_(src.delta(name).to(p.device, p.dtype))
                    gs = measure_grams(model, tokenizer, rows, names, options, eval_options)
                finally:
                    for name, orig in saved.items():
                        params[name].data.copy_(orig)
                    src.close()
            else:
                full, _ = load_model_and_tokenizer(experts[i], device=device.type, dtype=dtype)
                gs = measure_grams(full, tokenizer, rows, names, options, eval_options)
                del full
            if cache:
                gs.save(gram_cache_dir() / f"{keys[i]}.safetensors")
            out[i] = gs
    finally:
        reader.close()
    return out  # type: ignore[return-value]


def gram_options(recipe) -> tuple[GramOptions, Any]:
    """The statistics options of a recipe: ``rows`` from the method, the prompt options from ``eval:``."""
    rows = int(recipe.method.params.get("rows", DEFAULT_ROWS))
    eval_options = None
    if recipe.eval:
        opts = {k: v for k, v in recipe.eval.items() if k in EvalOptions.model_fields}
        eval_options = EvalOptions.model_validate(opts)
    return GramOptions(rows=rows), eval_options


def own_grams(recipe, base: Path, experts: Sequence[Path], *, names: Iterable[str] | None,
              device: torch.device | str = "cpu", say: Callable[[str], None] | None = None) -> list[GramSet]:
    """Each expert's statistics measured on its own model, for a recipe (see :func:`expert_grams`)."""

    options, eval_options = gram_options(recipe)
    return expert_grams(Path(base), [Path(e) for e in experts], [e.data for e in recipe.experts],
                        names=names, options=options, eval_options=eval_options, device=device, say=say)


def changed_names(expert_sources: Sequence[Any]) -> list[str] | None:
    """The tensors a set of opened experts change, when all are LoRA (else None: all linear layers)."""
    if all(getattr(s, "is_lora", False) for s in expert_sources):
        return sorted({n for s in expert_sources for n in s.modules})
    return None
