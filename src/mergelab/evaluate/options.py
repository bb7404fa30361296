"""Evaluation options: one pydantic model, used by the CLI and embedded as a recipe's ``eval:`` section."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergelab.errors import MergelabError



class EvalError(MergelabError):
    """Evaluation cannot run as asked (no chat template for --chat, no GPU for --device cuda, ...)."""


DEFAULT_COT_INSTRUCTION = 'Think step by step, then give the final answer as "Answer: <letter>".'


class EvalOptions(BaseModel):
    """How to evaluate a model on competition CSV files.

    Every field has a default, so ``EvalOptions()`` is the plain competition evaluation: greedy
    generation and log-probability multiple choice, no prompt changes. Unknown keys are refused,
    so a misspelt key in a recipe's ``eval:`` section is an error rather than silently ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(16, ge=1, description="rows per forward pass (choices of a row go along)")
    max_batch_tokens: int = Field(
        32768, ge=1,
        description="cap on padded tokens in one forward pass (rows x length, choices counted); "
                    "bounds memory on long inputs; a single row is always allowed")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per generation row")
    stop: list[str] = Field(
        default_factory=list,
        description="stop strings: generated text is cut at the first occurrence of any of them")
    max_length: int | None = Field(
        None, ge=8,
        description="longest token sequence fed to the model; longer prompts lose their beginning. "
                    "None: the model's max_position_embeddings (no limit when unknown)")
    chat: bool = Field(False, description="wrap each input in the tokenizer's chat template")
    few_shot: int = Field(0, ge=0, description="number of solved examples put before each input")
    shots: Path | None = Field(None, description="labelled CSV the few-shot examples are drawn from")
    shot_separator: str = Field("\n\n", description="text between few-shot examples and the input")
    cot: bool = Field(False, description="chain of thought for multiple choice: generate, then extract")
    cot_max_new_tokens: int = Field(256, ge=1, description="tokens generated for a chain of thought")
    cot_instruction: str = Field(DEFAULT_COT_INSTRUCTION,
                                 description="instruction appended after the listed options")
    length_norm: Literal["none", "tokens", "chars"] = Field(
        "none",
        description="multiple choice: rank choices by summed log-probability (none), or by it "
                    "divided by the choice's token count (tokens) or character count (chars)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on cpu, bfloat16 (float16 without bf16 support) on cuda")
    seed: int = Field(0, description="seeds the few-shot draws (the only randomness; decoding is greedy)")

    @field_validator("length_norm", mode="before")
    @classmethod
    def _bool_length_norm(cls, v):
        # YAML users write `length_norm: true`; read it as per-token normalisation.
        if v is True:
            return "tokens"
        if v is False or v is None:
            return "none"
        return v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("a stop string must not be empty")
        return v

    @model_validator(mode="after")
    def _shots_with_few_shot(self) -> EvalOptions:
        if self.few_shot > 0 and self.shots is None:
            raise ValueError("few_shot > 0 needs `shots`: a labelled CSV to draw the examples from")
        if self.shots is not None and self.few_shot == 0:
            raise ValueError("`shots` is given but few_shot is 0; set few_shot to the number of examples")
        return self
