"""The supervised training loop shared by the ``finetune:`` stage and the zoo's experts.

A row is ``(prompt, answer)``: the prompt and the answer are tokenized separately and joined —
exactly as the evaluator joins a prompt and a choice — and the loss covers the answer tokens only
(the prompt is masked with -100). Batches are right-padded; the order of the rows comes from the
caller's ``rng`` and the learning rate of each step from its ``lr_at``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


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
