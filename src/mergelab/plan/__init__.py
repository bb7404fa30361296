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
Large Transformer Models") for fine-tuning; (inputs + 2) × largest float32 tensor for the merge.

What it does not know: download time (models must be in the local cache before the clock
starts), early stops of generation at the end-of-sequence token (the estimate is for the full
``max_new_tokens``: an upper bound), attention FLOPs (small at these lengths), the page cache
(a file read twice is read from memory the second time).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from mergelab.errors import BudgetError, MergelabError

# Elementwise passes over each input tensor, per merge method family (reads + writes of float32
# copies: subtract the base, draw/apply masks, elect signs, sum, rescale).
METHOD_PASSES = {"linear": 2, "task_arithmetic": 3, "slerp": 6, "model_stock": 6, "geometric_median": 20}
DEFAULT_PASSES = 8   # ties, dare_*, breadcrumbs, della: masks, sign election, disjoint mean


class HardwareError(MergelabError):
    """An unknown hardware profile, or a broken hardware data file."""


# ------------------------------------------------------------------------------------ profiles


@dataclass(frozen=True)
class Profile:
    """Speeds and sizes of one device. Units: bytes, bytes/s, FLOP/s, seconds."""

    name: str
    label: str
    kind: str                      # "cuda" or "cpu"
    memory: float
    memory_bandwidth: float
    bf16_flops: float
    disk_read: float
    host_to_device: float
    matmul_efficiency: float
    bandwidth_efficiency: float
    layer_overhead: float          # seconds per decoder layer per forward call
    tensor_overhead: float         # seconds per tensor in the merge engine
    load_overhead: float           # seconds of fixed cost per model load
    sources: dict = field(default_factory=dict)

    @property
    def flops(self) -> float:
        """Achievable matmul throughput (FLOP/s)."""
        return self.bf16_flops * self.matmul_efficiency

    @property
    def bandwidth(self) -> float:
        """Achievable memory bandwidth (bytes/s)."""
        return self.memory_bandwidth * self.bandwidth_efficiency

    @property
    def weight_bytes(self) -> int:
        """Bytes per parameter when a model runs here: bf16 on a GPU, float32 on a CPU."""
        return 2 if self.kind == "cuda" else 4


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, Profile]:
    """The hardware profiles of ``mergelab/data/hardware.yaml`` (or ``path``), by name."""
    import yaml

    path = Path(path) if path is not None else Path(__file__).resolve().parents[1] / "data" / "hardware.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise HardwareError(f"{path}: cannot read the hardware profiles ({exc})") from None
    out = {}
    for name, entry in raw.items():
        try:
            fields = {k: (float(v) if k not in ("label", "kind", "sources") else v) for k, v in entry.items()}
            out[name] = Profile(name=name, **fields)
        except (TypeError, ValueError) as exc:
            raise HardwareError(f"{path}: profile {name!r} is malformed ({exc})") from None
        missing = [k for k in Profile.__dataclass_fields__ if k not in ("name", "label", "kind", "sources")
                   and k not in (out[name].sources or {}) and k != "host_to_device"]
        if missing:
            raise HardwareError(f"{path}: profile {name!r} gives no source for {', '.join(missing)}")
    return out


def get_profile(name: str) -> Profile:
    profiles = load_profiles()
    key = name.strip().lower()
    if key not in profiles:
        raise HardwareError(f"unknown hardware profile {name!r}; known: {', '.join(profiles)}",
                            hint="pass --hardware a6000 (the competition's card), a100, h100, l4 or cpu")
    return profiles[key]


# ----------------------------------------------------------------------------------- model sizes


@dataclass
class ModelInfo:
    """Sizes of one model or adapter folder, from its safetensors headers and config.json."""

    path: str
    params: int
    bytes: int
    tensors: int
    largest: int                    # elements of the largest tensor
    embedding_params: int = 0       # input embedding (no matmul) when a separate lm_head exists
    adapter: bool = False
    layers: int = 0
    hidden: int = 0
    intermediate: int = 0
    vocab: int = 0
    kv_dim: int = 0                 # key/value width per layer (kv heads × head dim)

    @property
    def matmul_params(self) -> int:
        return self.params - self.embedding_params


def inspect_model(folder: str | os.PathLike) -> ModelInfo:
    """Parameter count, bytes and shapes of a model or adapter folder, from headers only."""
    from mergelab.io.checkpoint import read_safetensors_header
    from mergelab.errors import CheckpointError

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files to size the model from",
                              hint="the planner reads safetensors headers; convert pickled weights first")
    params = nbytes = tensors = largest = embed = 0
    lm_head = False
    for f in files:
        infos, _ = read_safetensors_header(f)
        for name, info in infos.items():
            n = math.prod(info.shape)
            params += n
            nbytes += info.nbytes
            tensors += 1
            largest = max(largest, n)
            if name.endswith("embed_tokens.weight") or name.endswith("shared.weight"):
                embed = max(embed, n)
            if name.endswith("lm_head.weight"):
                lm_head = True
    info = ModelInfo(str(folder), params, nbytes, tensors, largest, embed if lm_head else 0,
                     adapter=(folder / "adapter_config.json").is_file())
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cfg = cfg.get("text_config", cfg)
        info.hidden = int(cfg.get("hidden_size") or cfg.get("d_model") or 0)
        info.layers = int(cfg.get("num_hidden_layers") or cfg.get("num_layers") or 0)
        if cfg.get("num_decoder_layers"):
            info.layers += int(cfg["num_decoder_layers"])
        info.intermediate = int(cfg.get("intermediate_size") or cfg.get("d_ff") or 4 * info.hidden)
        info.vocab = int(cfg.get("vocab_size") or 0)
        heads = int(cfg.get("num_attention_heads") or cfg.get("num_heads") or 1)
        head_dim = int(cfg.get("head_dim") or cfg.get("d_kv") or (info.hidden // max(heads, 1)))
        info.kv_dim = int(cfg.get("num_key_value_heads") or heads) * head_dim
    return info


# ------------------------------------------------------------------------------ evaluation work


@dataclass
class EvalWorkload:
    """What the evaluator will do, counted with the base's tokenizer."""

    rows_mc: int = 0
    rows_gen: int = 0
    prompt_tokens_mc: int = 0
    choice_tokens: int = 0
    prompt_tokens_gen: int = 0
    max_new_tokens: int = 64
    batches_mc: int = 0
    batches_gen: int = 0
    longest: int = 0                 # longest sequence (prompt + choice, or prompt + new tokens)
    batch_size: int = 16
    max_batch_tokens: int = 32768
    cot_rows: int = 0
    cot_max_new_tokens: int = 0

    @property
    def rows(self) -> int:
        return self.rows_mc + self.rows_gen


def eval_workload(tokenizer_dir: str | os.PathLike, files, options) -> EvalWorkload:
    """Tokenize the evaluation files as the evaluator will see them (prompts built the same way)."""
    from mergelab.evaluate import read_competition_csv
    from mergelab.evaluate.loading import load_tokenizer
    from mergelab.evaluate.prompting import ShotPool, build_prompt

    tok = load_tokenizer(tokenizer_dir)
    pool = ShotPool.from_csv(options.shots, options.few_shot) if options.few_shot else None
    special = not options.chat
    cap = options.max_length or 10 ** 9
    w = EvalWorkload(max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                     max_batch_tokens=options.max_batch_tokens)
    mc_tokens, gen_tokens = [], []
    for f in files:
        for row in read_competition_csv(f):
            shots = pool.draw(row, options.few_shot, options.seed) if pool else []
            prompt = build_prompt(row, tok, options, shots)
            n = min(len(tok(prompt, add_special_tokens=special)["input_ids"]), cap)
            if row.is_mc:
                c = [len(tok(ch, add_special_tokens=False)["input_ids"]) for ch in row.choices]
                w.rows_mc += 1
                w.prompt_tokens_mc += n
                w.choice_tokens += sum(c)
                mc_tokens.append(n + sum(c))
                w.longest = max(w.longest, n + max(c, default=0))
                if options.cot:
                    w.cot_rows += 1
            else:
                w.rows_gen += 1
                w.prompt_tokens_gen += n
                gen_tokens.append(n + options.max_new_tokens)
                w.longest = max(w.longest, n + options.max_new_tokens)
    if options.cot:
        w.cot_max_new_tokens = options.cot_max_new_tokens

    def batches(sizes: list[int]) -> int:
        if not sizes:
            return 0
        return max(math.ceil(len(sizes) / options.batch_size), math.ceil(sum(sizes) / options.max_batch_tokens))

    w.batches_mc, w.batches_gen = batches(mc_tokens), batches(gen_tokens)
    return w


# ----------------------------------------------------------------------------------- estimates


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
    peak = (len(experts) + 3) * base.largest * 4.0
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


def estimate_statistics(hw: Profile, model: ModelInfo, experts: list[ModelInfo], tokens: list[int],
                        batches: list[int]) -> StageEstimate:
    """RegMean's statistics pass: each expert's model runs over its data rows (prefill compute)
    while every measured layer input adds ``2·in²`` FLOPs per token to its Gram matrix.

    LoRA experts reuse the loaded base (their layers: the attention and MLP inputs, ``2·hidden²``
    per layer as a bound); full experts are loaded one by one and every linear input is measured
    (q/k/v and gate/up share theirs: ``3·hidden² + intermediate²`` per layer)."""
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
        "prefill": 2.0 * P * sum(tokens) / hw.flops,
        "gram": gram_flops / hw.flops,
        "overhead": sum(batches) * model.layers * hw.layer_overhead,
    }
    grams = (2 * hidden ** 2 if all(e.adapter for e in experts) else 3 * hidden ** 2 + inter ** 2) * model.layers * 8.0
    peak = model.params * hw.weight_bytes * 2 + grams
    return StageEstimate("statistics", sum(parts.values()), peak,
                         f"{len(experts)} expert(s), {sum(tokens)} tokens through the experts' models, "
                         "input Gram matrices of the merged linear layers", parts)


def _statistics_workload(tokenizer_dir: Path, recipe, options) -> tuple[list[int], list[int]]:
    """Prompt tokens and batches of each expert's statistics rows (see :mod:`mergelab.gram`)."""
    from mergelab.evaluate.batching import encode_prompt
    from mergelab.evaluate.loading import load_tokenizer
    from mergelab.evaluate.prompting import build_prompt
    from mergelab.merge.statistics import DEFAULT_MAX_LENGTH, DEFAULT_ROWS, GramOptions, read_inputs

    tok = load_tokenizer(tokenizer_dir)
    rows_wanted = int(recipe.method.params.get("rows", DEFAULT_ROWS))
    batch = GramOptions().batch_size
    tokens, batches = [], []
    for e in recipe.experts:
        rows = read_inputs(list(e.data or []), rows_wanted)
        n = sum(min(len(encode_prompt(tok, build_prompt(r, tok, options), add_special_tokens=not options.chat,
                                      encoder_decoder=False)), DEFAULT_MAX_LENGTH) for r in rows)
        tokens.append(n)
        batches.append(math.ceil(len(rows) / batch))
    return tokens, batches


def _dtype_bytes(name: str | None) -> float | None:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(name) if name else None


def _mean_example_tokens(tokenizer_dir: Path, files: list[Path], max_length: int) -> tuple[float, int]:
    from mergelab.evaluate.loading import load_tokenizer
    from mergelab.finetune.train import training_examples

    tok = load_tokenizer(tokenizer_dir)
    lengths = [min(len(tok(prompt + answer, add_special_tokens=False)["input_ids"]) + 1, max_length)
               for prompt, answer, _ in training_examples(files)]
    return (sum(lengths) / len(lengths) if lengths else 0.0), max(lengths, default=0)


def plan_run(recipe, finetune, eval_section, base_dir: Path, expert_dirs: list[Path], hw: Profile,
             budget_s: float, *, probe: dict | None = None) -> Plan:
    """The plan of a loaded recipe whose models are local folders (see :func:`plan_recipe`)."""
    base = inspect_model(base_dir)
    experts = [inspect_model(p) for p in expert_dirs]
    out_bytes = _dtype_bytes(recipe.output.dtype)
    stages: list[StageEstimate] = []
    models = {"base": asdict(base), **{f"expert {i}": asdict(e) for i, e in enumerate(experts, 1)}}
    notes = []

    ft_stage = None
    if finetune is not None:
        mean, longest = _mean_example_tokens(base_dir, [d.path for d in finetune.data], finetune.max_length)
        ft_stage = estimate_finetune(hw, base, finetune.steps, finetune.batch_size, mean, longest,
                                     finetune.rank, len(finetune.target_modules))
        # the trained adapter: A and B per target module and layer, counted as rank × hidden each, float32
        lora_bytes = len(finetune.target_modules) * base.layers * finetune.rank * 2 * base.hidden * 4
        if finetune.when == "before_merge":
            stages.append(ft_stage)
            experts = experts + [replace(base, bytes=lora_bytes, adapter=True, path="(fine-tuned adapter)")]
    from mergelab.methods import get_method

    if get_method(recipe.method.name).needs_gram:
        from mergelab.evaluate import EvalOptions

        options = eval_section.eval_options("auto") if eval_section is not None else EvalOptions()
        tokens, batches = _statistics_workload(base_dir, recipe, options)
        stages.append(estimate_statistics(hw, base, experts[:len(recipe.experts)], tokens, batches))
        notes.append("statistics are cached (~/.cache/mergelab/gram): a repeated merge skips that stage")
    stages.append(estimate_merge(hw, base, experts, recipe.method.name, out_bytes))
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
    return Plan(hw, budget_s, stages, models, workload, probe, notes=notes)


def plan_recipe(recipe_path: str | os.PathLike | Mapping[str, Any], *, hardware: str | Profile = "a6000",
                budget: float | str = "60m", calibrate_probe: bool = False, base_dir: str | None = None,
                progress: Callable[[str], None] | None = None) -> Plan:
    """Estimate a recipe's stages on ``hardware`` against ``budget`` (seconds or ``"60m"``).

    Hub models must already be in the local cache (the planner never downloads weights).
    With ``calibrate_probe`` the throughput, bandwidth and overheads are measured on this device
    (:func:`calibrate`) and replace the profile's.
    """
    from mergelab.run.pipeline import load_run_recipe

    say = progress or (lambda msg: None)
    recipe, finetune, eval_section, root = load_run_recipe(recipe_path, base_dir=base_dir)
    budget_s = parse_budget(budget)
    hw = get_profile(hardware) if isinstance(hardware, str) else hardware
    paths = []
    for ref in [recipe.base, *recipe.experts]:
        say(f"locating {ref}")
        paths.append(_local_folder(ref))
    probe = None
    if calibrate_probe:
        say("calibrating: matmul, memory copy and a forward pass on this device")
        probe = calibrate(base_dir=paths[0])
        hw = calibrated_profile(hw, probe)
    return plan_run(recipe, finetune, eval_section, paths[0], paths[1:], hw, budget_s, probe=probe)


def parse_budget(budget: float | str) -> float:
    from mergelab.recipe.sections import parse_duration

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
        from mergelab.errors import SourceError

        raise SourceError(f"{ref}: not in the local Hub cache, so its size is unknown ({type(exc).__name__})",
                          hint="download it first (mergelab check / huggingface-cli download), then plan") from None


# --------------------------------------------------------------------------------- calibration


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

    from mergelab.evaluate.loading import load_model_and_tokenizer

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


def model_info_from_config(cfg: Mapping[str, Any], dtype_bytes: int = 2, name: str = "(from config)") -> ModelInfo:
    """Sizes of a Llama/Mistral-style decoder from its ``config.json`` alone (no weights at hand).

    Per layer: q and o (h×h), k and v (h×kv), gate/up/down (h×inter), two norms; plus the
    embedding, the final norm and an untied ``lm_head``. Used to plan models not downloaded yet.
    """
    h, inter, layers = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    vocab = int(cfg["vocab_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads) * int(cfg.get("head_dim") or h // heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    tied = bool(cfg.get("tie_word_embeddings", False))
    embed = vocab * h
    params = layers * per_layer + embed + h + (0 if tied else embed)
    return ModelInfo(name, params, params * dtype_bytes, layers * 9 + 2 + (0 if tied else 1),
                     max(embed, h * inter), 0 if tied else embed, layers=layers, hidden=h,
                     intermediate=inter, vocab=vocab, kv_dim=kv)
