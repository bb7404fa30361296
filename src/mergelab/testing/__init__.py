"""Test fixtures (outside the layers; the product never imports it): tiny deterministic models, adapters, CSVs, and a Hub imitation.

Everything here builds in a temporary folder in seconds, with a fixed seed, and needs no network:

* :func:`make_tokenizer` trains a small byte-level BPE on a built-in corpus;
* :func:`make_base` writes a tiny random model of one family (``llama``, ``mistral``, ``gemma``,
  ``t5``) in Hugging Face layout as *sharded* safetensors with ``model.safetensors.index.json``;
* :func:`make_expert` writes a "fine-tune": the base plus a structured perturbation (low-rank plus
  sparse) that differs per seed;
* :func:`make_lora` writes a PEFT LoRA adapter of a base with non-zero ``B``;
* :func:`build_families` does all of the above for every family.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mergelab.zoo.tasks import write_csv

FAMILIES = ("llama", "mistral", "gemma", "t5")

# Target-module names of each family's linear layers (attention first, then MLP).
LINEAR_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "t5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is two plus three? Answer: five",
    "Merging models combines what fine-tuned experts learned into one set of weights.",
    "Sentiment: I loved this film, it was wonderful. Label: positive",
    "Translate to SQL: list all users older than 30. SELECT * FROM users WHERE age > 30;",
    "Dates: 2024-05-31 is the thirty-first of May, 2024.",
    "A B C D yes no true false 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } : ; , . ? !",
    "héllo wörld, naïve café, 東京, emoji 🙂 and quotes \"like this\".",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(out_dir: str | Path, vocab_size: int = 400, chat_template: bool = True):
    """Train a byte-level BPE tokenizer on a small corpus and save it (``tokenizer.json``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def _config(family: str, vocab_size: int, tok, hidden: int, layers: int):
    import transformers as tf

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, **ids)
    if family == "llama":
        return tf.LlamaConfig(tie_word_embeddings=False, **common), tf.LlamaForCausalLM
    if family == "mistral":
        return tf.MistralConfig(tie_word_embeddings=False, sliding_window=None, **common), \
            tf.MistralForCausalLM
    if family == "gemma":
        return tf.GemmaConfig(head_dim=hidden // 4, tie_word_embeddings=True, **common), \
            tf.GemmaForCausalLM
    if family == "t5":
        cfg = tf.T5Config(
            vocab_size=vocab_size, d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden,
            num_layers=layers, num_decoder_layers=layers, num_heads=4,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            decoder_start_token_id=tok.pad_token_id, **ids,
        )
        return cfg, tf.T5ForConditionalGeneration
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def make_base(family: str, out_dir: str | Path, *, seed: int = 0, hidden: int = 64,
              layers: int = 2, shard_size: str = "60KB", dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random model of ``family`` with its tokenizer, as sharded safetensors."""
    out_dir = Path(out_dir)
    tok = make_tokenizer(out_dir)
    cfg, cls = _config(family, len(tok), tok, hidden, layers)
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    with torch.no_grad():  # larger weights than the default init, so the models say different things
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out_dir), max_shard_size=shard_size, safe_serialization=True)
    return out_dir


def _copy_non_weights(src: Path, dst: Path) -> None:
    import shutil

    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)


def make_expert(base_dir: str | Path, out_dir: str | Path, *, seed: int, scale: float = 0.02,
                rank: int = 2, sparsity: float = 0.9, shard_size: str = "60KB") -> Path:
    """Write a "fine-tuned expert": every matrix of the base plus ``scale`` x (low-rank + sparse).

    The perturbation is structured (a rank-``rank`` part shared along rows and columns, and a
    sparse part keeping ``1 - sparsity`` of the entries), so sign conflicts, trimming and
    low-rank structure all occur, as they do between real fine-tunes.
    """
    from safetensors.torch import load_file, save_file

    from huggingface_hub import split_torch_state_dict_into_shards

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    gen = torch.Generator().manual_seed(10_000 + seed)
    for name in sorted(state):
        t = state[name]
        if not t.is_floating_point():
            continue
        if t.dim() == 2:
            u = torch.randn(t.shape[0], rank, generator=gen)
            v = torch.randn(rank, t.shape[1], generator=gen)
            sparse = torch.randn(t.shape, generator=gen) * (torch.rand(t.shape, generator=gen) > sparsity)
            delta = (u @ v) / rank**0.5 + 3 * sparse
        else:
            delta = torch.randn(t.shape, generator=gen)
        state[name] = (t.float() + scale * delta).to(t.dtype).contiguous()
    split = split_torch_state_dict_into_shards(state, max_shard_size=shard_size,
                                               filename_pattern="model{suffix}.safetensors")
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out_dir / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _copy_non_weights(base_dir, out_dir)
    return out_dir


def make_lora(base_dir: str | Path, out_dir: str | Path, *, seed: int, r: int = 4,
              alpha: float = 8.0, target_modules: list[str] | None = None,
              use_rslora: bool = False, rank_pattern: dict | None = None,
              alpha_pattern: dict | None = None, std: float = 0.05) -> Path:
    """Write a PEFT LoRA adapter of ``base_dir`` whose ``A`` and ``B`` are random and non-zero."""
    from peft import LoraConfig, get_peft_model

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    model = load_model(base_dir)
    family = "t5" if model.config.model_type == "t5" else "decoder"
    if target_modules is None:
        target_modules = ["q", "v"] if family == "t5" else ["q_proj", "v_proj"]
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                     use_rslora=use_rslora, rank_pattern=rank_pattern or {},
                     alpha_pattern=alpha_pattern or {}, lora_dropout=0.0,
                     task_type="SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(20_000 + seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a fixture (or any local) model with transformers, choosing the right auto class."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.from_pretrained(str(path))
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(str(path), dtype=dtype).eval()


@dataclass
class FamilyZoo:
    """The fixture models of one family."""

    family: str
    base: Path
    experts: list[Path] = field(default_factory=list)
    loras: list[Path] = field(default_factory=list)


def build_families(root: str | Path, families: tuple[str, ...] = FAMILIES, n_experts: int = 3) -> dict[str, FamilyZoo]:
    """Build base, ``n_experts`` full experts and three LoRA adapters for each family.

    The adapters differ in rank and target modules: (r=4, attention q/v), (r=8, q/k/v/o, rsLoRA)
    and (r=2, the MLP projections), so readers meet mixed ranks and missing modules.
    """
    root = Path(root)
    zoo = {}
    for i, fam in enumerate(families):
        fz = FamilyZoo(fam, make_base(fam, root / fam / "base", seed=i))
        for j in range(n_experts):
            fz.experts.append(make_expert(fz.base, root / fam / f"expert{j}", seed=100 * i + j))
        mods = LINEAR_MODULES[fam]
        specs = [dict(r=4, alpha=8, target_modules=[mods[0], mods[2]]),
                 dict(r=8, alpha=16, target_modules=mods[:4], use_rslora=True),
                 dict(r=2, alpha=4, target_modules=mods[4:])]
        for j, spec in enumerate(specs):
            fz.loras.append(make_lora(fz.base, root / fam / f"lora{j}", seed=100 * i + j, **spec))
        zoo[fam] = fz
    return zoo


def write_mixed_csv(path: str | Path, n: int, *, choice_input: str, choices: list[str],
                    gen_input: str, gen_target: str) -> Path:
    """Write ``n`` competition-format rows to ``path``: odd ids multiple choice (answer 0 of
    ``choices``), even ids generation. ``choice_input``, ``gen_input`` and ``gen_target`` are
    format strings of the row number ``{i}``."""

    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"id": str(i), "input": choice_input.format(i=i), "target": "0",
                         "answer_choices": json.dumps(choices), "eval_type": "multiple_choice"})
        else:
            rows.append({"id": str(i), "input": gen_input.format(i=i), "target": gen_target.format(i=i),
                         "answer_choices": "", "eval_type": "generation"})
    return write_csv(path, rows)


def tree_bytes(folder: str | Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, with its bytes (to compare output folders)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
