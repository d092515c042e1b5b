"""Discriminator configuration: one dataclass for every kind, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from uniapl_megatron.discriminator.base import DiscriminatorError, template_fields

KINDS = ("frozen", "online", "polar")
DTYPES = ("float32", "bfloat16", "float16")
SCORE_TRANSFORMS = ("logit", "prob", "log_prob")


@dataclass
class DiscriminatorConfig:
    # "polar": a POLAR checkpoint (InternLM2ForRewardModel, arXiv 2507.05197), the paper's frozen
    # discriminator, with POLAR's own input format (discriminator/polar.py). "frozen": any other
    # reference-conditioned reward model, never trained (generic template below). "online": trained
    # during the run, teacher answers real and rollouts fake (GAIL-style; goes beyond the paper).
    kind: Literal["frozen", "online", "polar"] = "frozen"
    # Hugging Face checkpoint folder (safetensors only): a *ForSequenceClassification model with one
    # label, or a causal LM / base model plus `value_head.safetensors` (tensors `weight` [1, H], `bias` [1]).
    # An online discriminator may also start from a plain causal LM (e.g. the student): its head starts at 0.
    path: str = ""
    # Tokenizer folder when it is not in `path`.
    tokenizer_path: str | None = None
    # Input text with {prompt}, {reference}, {candidate}; None takes the kind's default (base.py).
    # The online kind must not show {reference}: the real example is the reference itself.
    template: str | None = None
    # Token budgets per field; longer fields are cut at the end, before the template is filled.
    # For "polar", the reference and candidate budgets are POLAR's max_response_length (4096 in its
    # client) and the prompt gets what max_length leaves (POLAR's rule; max_prompt_tokens is unused).
    max_prompt_tokens: int = 1024
    max_reference_tokens: int = 1024
    max_candidate_tokens: int = 1024
    # Sequences per forward pass when scoring (no effect on the scores, only on memory and speed).
    batch_size: int = 8
    # "polar" only: most tokens per forward pass (rows x padded length; a longer row goes alone).
    max_tokens_per_batch: int = 16384
    # "polar" only: POLAR's max_length, the whole input's token budget (16384 in its client).
    max_length: int = 16384
    # "polar" only: which end of a too-long reference / candidate is kept ("right" cuts the end).
    response_cut_side: Literal["right", "left"] = "right"
    # "polar" only: POLAR's wrapper: "sft" puts a newline between prompt and answer, "pretrain" none.
    polar_wrapper: Literal["sft", "pretrain"] = "sft"
    # "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # Weights' dtype; float32 on CPU.
    dtype: str = "float32"
    # Run Python code shipped in the checkpoint folder (some reward models need it). Off: it executes
    # whatever the folder contains. For "polar" it only ever applies to the tokenizer.
    trust_remote_code: bool = False

    # --- online kind only ---
    # AdamW learning rate of the discriminator's own optimizer.
    lr: float = 1e-5
    # AdamW weight decay.
    weight_decay: float = 0.0
    # Train every `update_period` optimizer steps of the policy (step % update_period == 0).
    update_period: int = 1
    # Passes over one step's examples per update.
    update_epochs: int = 1
    # Examples per discriminator optimizer step.
    train_batch_size: int = 8
    # Gradient-norm clip of the discriminator's updates; 0 = off.
    max_grad_norm: float = 1.0
    # What score() returns from the logit z = log D / (1 - D): "logit" (z, AIRL-style), "prob"
    # (sigmoid z) or "log_prob" (log sigmoid z = log D, GAIL's reward).
    score_transform: str = "logit"
    # Seed of the example shuffling (combined with the step, so resuming replays the same order).
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self)


def _fail(field: str, expected: str, value: object) -> None:
    raise DiscriminatorError(f"discriminator.{field}: expected {expected}, got {value!r}")


def validate(cfg: DiscriminatorConfig) -> None:
    """Raise DiscriminatorError naming the first bad field (file checks happen at load time)."""
    for field, choices in (("kind", KINDS), ("dtype", DTYPES), ("score_transform", SCORE_TRANSFORMS),
                           ("response_cut_side", ("right", "left")), ("polar_wrapper", ("sft", "pretrain"))):
        if getattr(cfg, field) not in choices:
            _fail(field, "one of " + ", ".join(repr(c) for c in choices), getattr(cfg, field))
    if not isinstance(cfg.path, str) or not cfg.path:
        _fail("path", "a Hugging Face checkpoint folder", cfg.path)
    if not isinstance(cfg.device, str) or not (
        cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")
    ):
        _fail("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", cfg.device)
    for field in (
        "max_prompt_tokens",
        "max_reference_tokens",
        "max_candidate_tokens",
        "batch_size",
        "max_tokens_per_batch",
        "max_length",
        "update_period",
        "update_epochs",
        "train_batch_size",
    ):
        value = getattr(cfg, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(field, "an integer >= 1", value)
    for field, lo_open in (("lr", True), ("weight_decay", False), ("max_grad_norm", False)):
        value = getattr(cfg, field)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (lo_open and value == 0):
            _fail(field, "a number > 0" if lo_open else "a number >= 0", value)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        _fail("seed", "an integer >= 0", cfg.seed)
    if not isinstance(cfg.trust_remote_code, bool):
        _fail("trust_remote_code", "true or false", cfg.trust_remote_code)
    if cfg.kind == "polar" and cfg.template is not None:
        raise DiscriminatorError("discriminator.template: the polar kind has POLAR's own input format; leave it unset")
    if cfg.template is not None:
        fields = template_fields(cfg.template)
        if cfg.kind == "online" and "reference" in fields:
            raise DiscriminatorError(
                "discriminator.template: the online kind must not use {reference}: its real examples are "
                "the references themselves, so it would learn to detect copies"
            )
