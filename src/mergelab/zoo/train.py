"""LoRA training of one zoo expert, shaped like the competition's ``predibase/*`` adapters.

The adapter is rank 8, ``lora_alpha`` 16, on ``q_proj`` and ``v_proj``, no dropout, no bias.
Training is plain supervised fine-tuning on the task's training rows: the loss covers the answer
tokens only (the prompt is masked), the prompt and the answer are tokenized separately and joined
— exactly as the evaluator joins a prompt and a choice — and a generation answer ends with the
tokenizer's end-of-sequence token so that greedy decoding stops after it.

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



def encode_example(tokenizer, prompt: str, answer: str, *, add_eos: bool) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + answer`` and labels that mask the prompt with -100."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if add_eos:
        a = a + [tokenizer.eos_token_id]
    return p + a, [-100] * len(p) + a


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, labels)`` pairs into ``input_ids``, ``labels`` (-100 on padding) and
    ``attention_mask`` on ``device``."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, computing logits only where they are needed.

    Rows are right-padded and every label before the earliest answer token is -100, so only the
    last ``K`` positions need the output head (``logits_to_keep``, which every transformers
    causal LM accepts): with short answers after longer prompts this saves most of the work of
    the 49k-word output layer. Equal to the loss transformers computes from full logits.
    """
    labels = batch["labels"]
    width = labels.shape[1]
    answer = (labels != -100).any(dim=0).nonzero()
    first = int(answer[0]) if len(answer) else width - 1
    keep = width - first + 1                    # logits at positions first-1 … width-1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep).logits
    pred = logits[:, :-1].float()              # position p predicts token p + 1
    target = labels[:, width - keep + 1:]
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batch_indices(n: int, batch_size: int, rng):
    """Row indices of successive batches: shuffled passes over ``n`` rows, drawn with ``rng``."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:  # a fresh shuffled pass over the rows
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def run_steps(model, opt, encoded: Sequence[tuple[list[int], list[int]]], *, steps: int, batch_size: int, rng,
              lr_at: Callable[[int], float], pad_id: int, device,
              on_step: Callable[[int, float], None] | None = None,
              stop: Callable[[], bool] | None = None) -> list[float]:
    """The training loop of every mergelab trainer; returns the loss of each step taken.

    Each step draws a batch (:func:`batch_indices`), sets the learning rate ``lr_at(step)``, and
    takes one optimiser step on the answer loss (:func:`answer_loss`). ``stop()`` is asked after
    each step but the last; True ends the loop early.
    """
    losses: list[float] = []
    draws = batch_indices(len(encoded), batch_size, rng)
    for step in range(steps):
        batch = collate([encoded[i] for i in next(draws)], pad_id, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = answer_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if stop is not None and step + 1 < steps and stop():
            break
    return losses


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
