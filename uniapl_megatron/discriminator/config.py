"""Discriminator configuration: one dataclass for both kinds, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass

from uniapl_megatron.discriminator.base import DiscriminatorError, template_fields

KINDS = ("frozen", "online")
DTYPES = ("float32", "bfloat16", "float16")
SCORE_TRANSFORMS = ("logit", "prob", "log_prob")


@dataclass
class DiscriminatorConfig:
    # "frozen": a reference-conditioned reward model that is never trained (UniAPL, after POLAR,
    # arXiv 2507.05197). "online": trained during the run, teacher answers real and rollouts fake
    # (GAIL-style; goes beyond the paper, answering the point that a frozen judge is not adversarial).
    kind: str = "frozen"
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
    max_prompt_tokens: int = 1024
    max_reference_tokens: int = 1024
    max_candidate_tokens: int = 1024
    # Sequences per forward pass when scoring (no effect on the scores, only on memory and speed).
    batch_size: int = 8
    # "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # Weights' dtype; float32 on CPU.
    dtype: str = "float32"
    # Run Python code shipped in the checkpoint folder (some reward models need it). Off: it executes
    # whatever the folder contains.
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
    for field, choices in (("kind", KINDS), ("dtype", DTYPES), ("score_transform", SCORE_TRANSFORMS)):
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
    if cfg.template is not None:
        fields = template_fields(cfg.template)
        if cfg.kind == "online" and "reference" in fields:
            raise DiscriminatorError(
                "discriminator.template: the online kind must not use {reference}: its real examples are "
                "the references themselves, so it would learn to detect copies"
            )
