"""``mergelab plan``: will this recipe fit the hour (and the memory) on the target GPU?

The plan is a roofline-style estimate per stage, computed without loading any weights:

* **sizes** from the safetensors headers of the base, the experts and the adapters (bytes,
  parameter counts, tensor counts) and the model's ``config.json`` (layers, hidden size, KV heads);
* **work** from the recipe: the evaluation CSVs tokenized with the base's tokenizer (prompt
  tokens, choice tokens, ``max_new_tokens`` per generation row, batches as the evaluator forms
  them), and the ``finetune:`` section (steps × batch × mean example length);
* **speed** from a hardware profile (``mergelab/data/hardware.yaml``: memory, bandwidth, bf16
  throughput, disk read, each with its source), or from figures measured on this device with
  ``--calibrate`` (:func:`calibrate`).

The model of each stage (``P`` = parameters, ``T`` = tokens, ``B`` = weight bytes):

=============  ===================================================================================
merge          read inputs from disk + copy to the device + ``passes`` elementwise passes over
               float32 copies of every input tensor at memory bandwidth + write the output +
               a fixed cost per tensor (the engine is bandwidth bound; FLOPs are negligible)
fine-tune      load the model, then ``steps`` × (6·P·T_step FLOPs at the achievable fraction of
               peak + 3 forward-call overheads); ``6·P·T`` is the usual dense training count, an
               upper bound for LoRA (frozen weights need no weight gradients: ~4·P·T)
fold           (``after_merge``) a task-arithmetic merge of the trained adapter into the model
evaluation     load the model; prefill ``2·P·T`` FLOPs at the achievable fraction of peak; each
               decode step of a generation batch reads the weights and the KV cache at memory
               bandwidth (or ``2·P·batch`` FLOPs if that is slower); every forward call pays a
               per-layer overhead (Python and kernel launches in eager mode)
=============  ===================================================================================

Peak memory per stage: weights + KV cache + activations of the largest batch (evaluation);
weights + LoRA parameters with gradients and AdamW states + activations ≈ 34·s·b·h bytes per
layer for 16-bit activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models") for fine-tuning; for the merge, two workers' row blocks
(``BLOCK_MEMORY`` × the engine's block budget each) for a method with a block form, whatever the
model, the vocabulary or the number of experts, and (inputs + 3) × the largest float32 tensor for
a method merged whole (SVD-based). The block forms that solve with ``in × in`` matrices add them:
RegMean's Gram matrices and ``M``'s factors, ``in²`` per expert for the widest input (the
intermediate width); WUDI's ``τᵢᵀτᵢ`` (``in²`` per expert) and Iso-C's ``MᵀM`` (a few ``in²``)
for the layers they split (``in ≤ out``: the hidden width), while they merge a narrowing layer
(``down_proj``) whole.

What it does not know: download time (models must be in the local cache before the clock
starts), early stops of generation at the end-of-sequence token (the estimate is for the full
``max_new_tokens``: an upper bound), attention FLOPs (small at these lengths), the page cache
(a file read twice is read from memory the second time).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from mergelab.errors import BudgetError, SourceError
from mergelab.evaluate import EvalOptions
from mergelab.merge.full import BLOCK_BYTES
from mergelab.methods import get_method
from mergelab.plan.calibrate import calibrate, calibrated_profile
from mergelab.plan.profiles import Profile, get_profile
from mergelab.plan.sizes import ModelInfo, inspect_model, inspect_stack
from mergelab.plan.workload import EvalWorkload, eval_workload, mean_example_tokens, statistics_workload
from mergelab.recipe.sections import parse_duration
from mergelab.recipe import read_recipe

# Elementwise passes over each input tensor, per merge method family (reads + writes of float32
# copies: subtract the base, draw/apply masks, elect signs, sum, rescale).
#: effective float32 passes over every input of the merge, by method. TIES, DARE-TIES and model
#: stock were fitted to bench/real_scale.py's CPU runs (2026-12-03, Mistral-7B/Gemma-7B shapes,
#: row blocks: the cut's pass, the random draws — about 12 ns each on this CPU — and the apply);
#: slerp (6) was not fitted and came within 1.20× of its measured run with --calibrate.
METHOD_PASSES = {"linear": 2, "task_arithmetic": 3, "slerp": 6, "model_stock": 9, "geometric_median": 20,
                 "passthrough": 1, "ties": 11, "breadcrumbs": 11, "breadcrumbs_ties": 11, "sce": 14,
                 "dare_ties": 20, "dare_linear": 20, "della": 24, "della_linear": 24}
DEFAULT_PASSES = 8   # the other methods: a few passes each (norms or Gram matrices, then the sum)


@dataclass
class StageEstimate:
    name: str
    seconds: float
    peak_memory: float              # bytes on the device
    detail: str = ""
    parts: dict = field(default_factory=dict)   # seconds of each term, for the curious


@dataclass
class Plan:
    """The estimate of a recipe on one device, with its verdict."""

    hardware: Profile
    budget_s: float
    stages: list[StageEstimate]
    models: dict[str, dict]
    workload: dict | None = None
    probe: dict | None = None
    download_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def peak_memory(self) -> float:
        return max((s.peak_memory for s in self.stages), default=0.0)

    def stage(self, name: str) -> StageEstimate | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def over_memory(self) -> list[StageEstimate]:
        return [s for s in self.stages if s.peak_memory > self.hardware.memory]

    @property
    def fits(self) -> bool:
        return self.total_s <= self.budget_s and not self.over_memory

    @property
    def verdict(self) -> str:
        lines = []
        for s in self.over_memory:
            lines.append(f"stage {s.name} needs {fmt_bytes(s.peak_memory)} of device memory; "
                         f"the {self.hardware.name} has {fmt_bytes(self.hardware.memory)}")
        if self.total_s > self.budget_s:
            worst = max(self.stages, key=lambda s: s.seconds)
            lines.append(f"over budget: {_minutes(self.total_s)} estimated > {_minutes(self.budget_s)} budget; "
                         f"the longest stage is {worst.name} ({_minutes(worst.seconds)})")
        if not lines:
            return (f"fits: {_minutes(self.total_s)} of {_minutes(self.budget_s)} on the {self.hardware.name}, "
                    f"{_minutes(self.budget_s - self.total_s)} to spare; peak memory "
                    f"{fmt_bytes(self.peak_memory)} of {fmt_bytes(self.hardware.memory)}")
        return "does not fit: " + "; ".join(lines)

    def to_dict(self) -> dict:
        hw = asdict(self.hardware)
        return {"hardware": hw, "budget_s": self.budget_s, "total_s": self.total_s,
                "peak_memory": self.peak_memory, "fits": self.fits, "verdict": self.verdict,
                "stages": [asdict(s) for s in self.stages], "models": self.models,
                "workload": self.workload, "probe": self.probe, "download_bytes": self.download_bytes,
                "notes": self.notes}


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _minutes(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _load_seconds(hw: Profile, nbytes: float) -> float:
    """One model load: fixed set-up + read from disk + copy to the device."""
    return hw.load_overhead + nbytes / hw.disk_read + (nbytes / hw.host_to_device if hw.kind == "cuda" else 0.0)


#: a row block's working set (inputs in float32, the raw reads, masks and the result) per byte of
#: its float32 inputs, as measured on the real-scale TIES merges (bench/real_scale.py)
BLOCK_MEMORY = 2.5
MERGE_WORKERS = 2


def merge_peak_memory(base: ModelInfo, n_experts: int, method: str) -> float:
    """Peak bytes of the merge's working set (the engine's, not the process' fixed overhead)."""
    whole = (n_experts + 3) * base.largest * 4.0
    try:
        spec = get_method(method)
    except Exception:  # an unknown method is reported by the recipe check, not here
        return whole
    if not spec.blocks:
        return whole
    blocks = min(whole, MERGE_WORKERS * BLOCK_MEMORY * BLOCK_BYTES)
    if spec.needs_gram:   # RegMean, per worker: each expert's Gram matrix (float32, float64) and M, its LU
        width = float(max(base.hidden, base.intermediate))
        return blocks + MERGE_WORKERS * (3 * n_experts + 4) * width ** 2 * 4.0
    if spec.name in ("wudi", "iso_c", "tsv", "iso_cts"):   # split where in ≤ out (in = hidden); down_proj whole
        hidden, inter = float(base.hidden), float(base.intermediate)
        n = n_experts
        if spec.name == "wudi":   # per worker: each expert's τᵢᵀτᵢ (float64, then float32) and G
            square, narrow = 3 * n + 1, (n + 5) * hidden * inter + inter ** 2
        elif spec.name == "iso_c":   # per worker: MᵀM, its eigenvectors and the projection (float64)
            square, narrow = 6, (n + 5) * hidden * inter
        elif spec.name == "tsv":   # per worker: each τᵢᵀτᵢ (float64), then eigenvectors, UᵀU, the polar
            # factors and the projection; whole: inputs, task vectors and each one's SVD (Vhᵢ: out × in)
            square, narrow = 2 * n + 12, (3 * n + 5) * hidden * inter
        else:                      # iso_cts: each τᵢᵀτᵢ and Mᵀτᵢ (float64), then as tsv; whole: inputs,
            # task vectors, M's SVD and each residual's
            square, narrow = 4 * n + 12, (2 * n + 8) * hidden * inter
        return max(blocks + MERGE_WORKERS * square * hidden ** 2 * 4.0, narrow * 4.0)
    return blocks


def estimate_merge(hw: Profile, base: ModelInfo, experts: list[ModelInfo], method: str,
                   out_dtype_bytes: float | None) -> StageEstimate:
    """The merge: bandwidth bound on the bytes read, moved, touched and written."""
    bytes_in = base.bytes + sum(e.bytes for e in experts)
    per_param = base.bytes / max(base.params, 1)
    bytes_out = base.params * (out_dtype_bytes or per_param)
    passes = METHOD_PASSES.get(method, DEFAULT_PASSES)
    touched = 4.0 * base.params * (len(experts) + 1) * passes       # float32 working copies
    parts = {
        "disk": (bytes_in + bytes_out) / hw.disk_read,
        "transfer": (bytes_in + bytes_out) / hw.host_to_device if hw.kind == "cuda" else 0.0,
        "compute": touched / hw.bandwidth,
        "per_tensor": base.tensors * hw.tensor_overhead,
    }
    peak = merge_peak_memory(base, len(experts), method)
    return StageEstimate("merge", sum(parts.values()), peak,
                         f"{len(experts)} expert(s), {fmt_bytes(bytes_in)} read, {fmt_bytes(bytes_out)} written, "
                         f"{passes} passes ({method})", parts)


def estimate_finetune(hw: Profile, model: ModelInfo, steps: int, batch_size: int, mean_tokens: float,
                      max_tokens: int, rank: int, n_targets: int, *, name: str = "finetune") -> StageEstimate:
    """LoRA training: 6·P·T FLOPs per step at the achievable fraction of peak, plus overheads."""
    tokens_step = batch_size * mean_tokens
    lora_params = n_targets * model.layers * rank * 2 * max(model.hidden, 1)
    parts = {
        "load": _load_seconds(hw, model.params * hw.weight_bytes),
        "compute": steps * 6.0 * model.matmul_params * tokens_step / hw.flops,
        "overhead": steps * 3 * model.layers * hw.layer_overhead,
    }
    act = 34.0 * max_tokens * batch_size * max(model.hidden, 1) * model.layers * (hw.weight_bytes / 2)
    logits = batch_size * max_tokens * max(model.vocab, 1) * 4.0 * 2
    peak = model.params * hw.weight_bytes + lora_params * 16.0 + act + logits
    return StageEstimate(name, sum(parts.values()), peak,
                         f"{steps} steps × {batch_size} rows × {mean_tokens:.0f} tokens, LoRA r={rank}", parts)


def estimate_eval(hw: Profile, model: ModelInfo, w: EvalWorkload) -> StageEstimate:
    """Evaluation: prefill compute bound, decode bandwidth bound, each forward call's overhead."""
    P = model.matmul_params
    weights = model.params * hw.weight_bytes
    kv_per_token = 2 * model.layers * max(model.kv_dim, 1) * hw.weight_bytes
    call = model.layers * hw.layer_overhead
    prefill_tokens = w.prompt_tokens_mc + w.choice_tokens + w.prompt_tokens_gen + w.cot_rows * 0
    # decode: each step of a batch reads the weights and its KV cache
    rows_per_batch = w.rows_gen / w.batches_gen if w.batches_gen else 0
    ctx = (w.prompt_tokens_gen / max(w.rows_gen, 1)) + w.max_new_tokens / 2
    step_bytes = weights + rows_per_batch * ctx * kv_per_token
    step_s = max(step_bytes / hw.bandwidth, 2.0 * P * rows_per_batch / hw.flops) if w.rows_gen else 0.0
    decode_steps = w.batches_gen * w.max_new_tokens
    cot_steps = math.ceil(w.cot_rows / max(w.batch_size, 1)) * w.cot_max_new_tokens
    parts = {
        "load": _load_seconds(hw, weights),
        "prefill": 2.0 * P * prefill_tokens / hw.flops,
        "decode": (decode_steps + cot_steps) * step_s,
        "overhead": (2 * w.batches_mc + w.batches_gen + decode_steps + cot_steps) * call,
    }
    batch_tokens = min(w.max_batch_tokens, max(w.longest, 1) * w.batch_size)
    act = batch_tokens * (4 * max(model.hidden, 1) + 3 * max(model.intermediate, 1)) * hw.weight_bytes
    kv = batch_tokens * kv_per_token
    logits = w.batch_size * max(model.vocab, 1) * 4.0 * 2
    peak = weights + kv + act + logits
    detail = (f"{w.rows_mc} multiple-choice + {w.rows_gen} generation rows; "
              f"{prefill_tokens} prefill tokens; {decode_steps + cot_steps} decode steps")
    return StageEstimate("eval", sum(parts.values()), peak, detail, parts)


def merged_passes(model: ModelInfo, experts: list[ModelInfo]) -> float:
    """Forward passes over each row that measuring in the merged model (``regmean_pp``) costs.

    A decoder runs once to cache layer 0's inputs, then every layer twice (the expert's own for
    the statistics, the merged one to feed the next layer): 3; one more when full experts make the
    untied output head a measured layer (the whole merged model runs again). An encoder–decoder
    model reruns from its first layer up to each layer: ``(L + 1) / 2``."""
    if model.encoder_decoder:
        return (model.layers + 1) / 2
    head = model.embedding_params > 0 and not all(e.adapter for e in experts)
    return 3.0 + (1.0 if head else 0.0)


def estimate_statistics(hw: Profile, model: ModelInfo, experts: list[ModelInfo], tokens: list[int],
                        batches: list[int], passes: float = 1.0) -> StageEstimate:
    """RegMean's statistics pass: each expert's model runs over its data rows (prefill compute)
    while every measured layer input adds ``2·in²`` FLOPs per token to its Gram matrix.

    LoRA experts reuse the loaded base (their layers: the attention and MLP inputs, ``2·hidden²``
    per layer as a bound); full experts are loaded one by one and every linear input is measured
    (q/k/v and gate/up share theirs: ``3·hidden² + intermediate²`` per layer). ``passes``: forward
    passes per row (RegMean 1; measured in the merged model, :func:`merged_passes`)."""
    P = model.matmul_params
    hidden, inter = max(model.hidden, 1), max(model.intermediate, 1)
    loads = _load_seconds(hw, model.params * hw.weight_bytes)
    gram_flops = 0.0
    for e, n in zip(experts, tokens):
        per_token = (2 * hidden ** 2 if e.adapter else 3 * hidden ** 2 + inter ** 2) * model.layers
        gram_flops += 2.0 * n * per_token
        if not e.adapter:
            loads += _load_seconds(hw, model.params * hw.weight_bytes)
    parts = {
        "load": loads,
        "prefill": passes * 2.0 * P * sum(tokens) / hw.flops,
        "gram": gram_flops / hw.flops,
        "overhead": passes * sum(batches) * model.layers * hw.layer_overhead,
    }
    grams = (2 * hidden ** 2 if all(e.adapter for e in experts) else 3 * hidden ** 2 + inter ** 2) * model.layers * 8.0
    peak = model.params * hw.weight_bytes * 2 + grams
    if passes != 1.0 and not model.encoder_decoder:   # the merged pass holds every expert's hidden states
        peak += sum(tokens) * model.hidden * hw.weight_bytes
    where = "the experts' models" if passes == 1.0 else "the merged model, layer by layer"
    return StageEstimate("statistics", sum(parts.values()), peak,
                         f"{len(experts)} expert(s), {sum(tokens)} tokens through {where}, "
                         "input Gram matrices of the merged linear layers", parts)


def _dtype_bytes(name: str | None) -> float | None:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(name) if name else None


def plan_run(recipe, finetune, eval_section, base_dir: Path, expert_dirs: list[Path], hw: Profile,
             budget_s: float, *, probe: dict | None = None) -> Plan:
    """The plan of a loaded recipe whose models are local folders (see :func:`plan_recipe`; for a
    layer stack, ``expert_dirs`` are the folders of ``recipe.stack_models()``)."""
    base = inspect_model(base_dir)
    experts = [inspect_model(p) for p in expert_dirs]
    out_bytes = _dtype_bytes(recipe.output.dtype)
    stages: list[StageEstimate] = []
    notes = []
    if recipe.slices is not None:   # a layer stack: what is copied, fine-tuned and evaluated is the stacked model
        roles = [role for role, _ in recipe.stack_models()]
        models = {"base": asdict(base), **{role: asdict(e) for role, e in zip(roles, experts)}}
        folders = {(ref.path, ref.model, ref.revision): d for (_, ref), d in zip(recipe.stack_models(), expert_dirs)}
        base = inspect_stack([(folders[(s.path, s.model, s.revision)], *s.layer_range) for s in recipe.slices],
                             base_dir)
        models["result"] = asdict(base)
        experts = []
    else:
        models = {"base": asdict(base), **{f"expert {i}": asdict(e) for i, e in enumerate(experts, 1)}}

    ft_stage = None
    if finetune is not None:
        mean, longest = mean_example_tokens(base_dir, [d.path for d in finetune.data], finetune.max_length)
        ft_stage = estimate_finetune(hw, base, finetune.steps, finetune.batch_size, mean, longest,
                                     finetune.rank, len(finetune.target_modules))
        # the trained adapter: A and B per target module and layer, counted as rank × hidden each, float32
        lora_bytes = len(finetune.target_modules) * base.layers * finetune.rank * 2 * base.hidden * 4
        if finetune.when == "before_merge":
            stages.append(ft_stage)
            experts = experts + [replace(base, bytes=lora_bytes, adapter=True, path="(fine-tuned adapter)")]
    spec = get_method(recipe.method.name)
    if spec.needs_gram:
        options = eval_section.eval_options("auto") if eval_section is not None else EvalOptions()
        tokens, batches = statistics_workload(base_dir, recipe, options)
        merged = experts[:len(recipe.experts)]
        stages.append(estimate_statistics(hw, base, merged, tokens, batches,
                                          merged_passes(base, merged) if spec.merged_stats else 1.0))
        notes.append("statistics are cached (~/.cache/mergelab/gram): a repeated merge skips that stage")
    merge_stage = estimate_merge(hw, base, experts, recipe.method.name, out_bytes)
    if recipe.slices is not None:
        size = f"{base.params / 1e9:.2f}B" if base.params >= 1e8 else f"{base.params:,}"
        merge_stage.detail = (f"{len(recipe.slices)} slice(s) stacked into {base.layers} layers ({size} parameters), "
                              f"{fmt_bytes(base.bytes)} copied (passthrough)")
    stages.append(merge_stage)
    if recipe.output.format == "lora":
        notes.append("format: lora: the merge re-factors ΔW by SVD; its cost is estimated as a dense merge")
    if ft_stage is not None and finetune.when == "after_merge":
        stages.append(ft_stage)
        adapter = replace(base, bytes=lora_bytes)
        fold = estimate_merge(hw, base, [adapter], "task_arithmetic", out_bytes)
        stages.append(replace(fold, name="fold", detail="trained adapter folded into the merged model"))
    workload = None
    if eval_section is not None:
        options = eval_section.eval_options("auto")
        w = eval_workload(base_dir, eval_section.data, options)
        workload = asdict(w)
        stages.append(estimate_eval(hw, base, w))
        if getattr(eval_section, "compare_base", False):   # the base on the same files: the same work
            stages.append(replace(stages[-1], name="base_eval",
                                  detail="the base on the same files (eval.compare_base; skipped at the deadline)"))
    return Plan(hw, budget_s, stages, models, workload, probe, notes=notes)


def plan_recipe(recipe_path: str | os.PathLike | Mapping[str, Any], *, hardware: str | Profile = "a6000",
                budget: float | str = "60m", calibrate_probe: bool = False, base_dir: str | None = None,
                progress: Callable[[str], None] | None = None) -> Plan:
    """Estimate a recipe's stages on ``hardware`` against ``budget`` (seconds or ``"60m"``).

    Hub models must already be in the local cache (the planner never downloads weights).
    With ``calibrate_probe`` the throughput, bandwidth and overheads are measured on this device
    (:func:`calibrate`) and replace the profile's.
    """
    say = progress or (lambda msg: None)
    doc = read_recipe(recipe_path, base_dir=base_dir)
    recipe, finetune, eval_section, root = doc.recipe, doc.finetune, doc.eval, doc.root
    budget_s = parse_budget(budget)
    hw = get_profile(hardware) if isinstance(hardware, str) else hardware
    paths = []
    for ref in [recipe.base, *recipe.experts, *(ref for _, ref in recipe.stack_models())]:
        say(f"locating {ref}")
        paths.append(_local_folder(ref))
    probe = None
    if calibrate_probe:
        say("calibrating: matmul, memory copy and a forward pass on this device")
        probe = calibrate(base_dir=paths[0])
        hw = calibrated_profile(hw, probe)
    return plan_run(recipe, finetune, eval_section, paths[0], paths[1:], hw, budget_s, probe=probe)


def parse_budget(budget: float | str) -> float:
    try:
        return parse_duration(budget)
    except ValueError as exc:
        raise BudgetError(f"budget: {exc}", hint="write e.g. --budget 60m, 3600 or 1h") from None


def _local_folder(ref) -> Path:
    """A model reference as a local folder, without downloading (the Hub cache only)."""
    if ref.path is not None:
        return Path(ref.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref.model, revision=ref.revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several kinds here
        raise SourceError(f"{ref}: not in the local Hub cache, so its size is unknown ({type(exc).__name__})",
                          hint="download it first (mergelab check / huggingface-cli download), then plan") from None
