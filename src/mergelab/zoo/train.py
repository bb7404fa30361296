"""LoRA training of one zoo expert, shaped like the competition's ``predibase/*`` adapters.

The adapter is rank 8, ``lora_alpha`` 16, on ``q_proj`` and ``v_proj``, no dropout, no bias.
Training is plain supervised fine-tuning on the task's training rows: the loss covers the answer
tokens only (the prompt is masked), the prompt and the answer are tokenized separately and joined
— exactly as the evaluator joins a prompt and a choice — and a generation answer ends with the
tokenizer's end-of-sequence token so that greedy decoding stops after it. The loop itself is
:mod:`mergelab.finetune.loop`, shared with the recipe's ``finetune:`` stage.

Everything random (the LoRA ``A`` initialisation, the order of the rows) comes from ``seed``; on
one device with one torch version the same call writes the same adapter.
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from mergelab.finetune.loop import encode_example, run_steps

LORA_RANK = 8
LORA_ALPHA = 16
TARGET_MODULES = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one expert's training run."""

    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    r: int = LORA_RANK
    alpha: int = LORA_ALPHA
    target_modules: tuple[str, ...] = TARGET_MODULES


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_lora(model, tokenizer, examples: Sequence[tuple[str, str, bool]], out_dir: str | Path,
               cfg: TrainConfig = TrainConfig(), *, base_model_name_or_path: str | None = None,
               on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train a LoRA adapter on ``examples`` and save it in PEFT layout to ``out_dir``.

    ``model`` is a loaded causal LM (left unchanged: the LoRA layers are removed again at the
    end); ``examples`` are ``(prompt, answer, add_eos)`` triples. ``on_step(step, loss)`` is
    called after each optimiser step. Returns the loss of every step.
    """
    from peft import LoraConfig, get_peft_model

    if not examples:
        raise ValueError("train_lora needs at least one example")
    device = next(model.parameters()).device
    encoded = [encode_example(tokenizer, p, a, add_eos=eos) for p, a, eos in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(cfg.seed)  # the LoRA A initialisation draws from the global generator
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lcfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order_rng = random.Random(cfg.seed)
    peft_model.train()
    try:
        losses = run_steps(peft_model, opt, encoded, steps=cfg.steps, batch_size=cfg.batch_size, rng=order_rng,
                           lr_at=lambda step: _lr_at(step, cfg), pad_id=pad_id, device=device, on_step=on_step)
        peft_model.eval()
        if base_model_name_or_path is not None:
            peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
    finally:
        peft_model.unload()  # take the LoRA layers out again: the caller's model is unchanged
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
    return losses
