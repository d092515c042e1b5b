"""Discriminator configuration: one dataclass for every kind, checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from uniapl_megatron.config_fields import FINITE, Device, Ge, Gt, MinLen, check_fields
from uniapl_megatron.discriminator.base import DiscriminatorError, template_fields

Positive = Annotated[int, Ge(1)]


@dataclass
class DiscriminatorConfig:
    kind: Literal["frozen", "online", "polar"] = "frozen"
    """"polar": a POLAR checkpoint (InternLM2ForRewardModel, arXiv 2507.05197), the paper's frozen
    discriminator, with POLAR's own input format (discriminator/polar.py). "frozen": any other
    reference-conditioned reward model, never trained (generic template below). "online": trained
    during the run, teacher answers real and rollouts fake (GAIL-style; goes beyond the paper)."""
    path: Annotated[str, MinLen(1), "a Hugging Face checkpoint folder"] = ""
    """Hugging Face checkpoint folder (safetensors only): a *ForSequenceClassification model with one
    label, or a causal LM / base model plus `value_head.safetensors` (tensors `weight` [1, H], `bias` [1]).
    An online discriminator may also start from a plain causal LM (e.g. the student): its head starts at 0."""
    tokenizer_path: str | None = None
    """Tokenizer folder when it is not in `path`."""
    template: str | None = None
    """Input text with {prompt}, {reference}, {candidate}; None takes the kind's default (base.py).
    The online kind must not show {reference}: the real example is the reference itself."""
    max_prompt_tokens: Positive = 1024
    """Token budget of the prompt; longer fields are cut at the end, before the template is filled.
    For "polar", the reference and candidate budgets are POLAR's max_response_length (4096 in its
    client) and the prompt gets what max_length leaves (POLAR's rule; max_prompt_tokens is unused)."""
    max_reference_tokens: Positive = 1024
    """Token budget of the reference (the teacher's answer)."""
    max_candidate_tokens: Positive = 1024
    """Token budget of the candidate (the rollout)."""
    batch_size: Positive = 8
    """Sequences per forward pass when scoring (no effect on the scores, only on memory and speed)."""
    max_tokens_per_batch: Positive = 16384
    """"polar" only: most tokens per forward pass (rows x padded length; a longer row goes alone)."""
    max_length: Positive = 16384
    """"polar" only: POLAR's max_length, the whole input's token budget (16384 in its client)."""
    response_cut_side: Literal["right", "left"] = "right"
    """"polar" only: which end of a too-long reference / candidate is kept ("right" cuts the end)."""
    polar_wrapper: Literal["sft", "pretrain"] = "sft"
    """"polar" only: POLAR's wrapper: "sft" puts a newline between prompt and answer, "pretrain" none."""
    device: Device = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N"."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype; float32 on CPU."""
    trust_remote_code: bool = False
    """Run Python code shipped in the checkpoint folder (some reward models need it). Off: it executes
    whatever the folder contains. For "polar" it only ever applies to the tokenizer."""

    # --- online kind only ---
    lr: Annotated[float, Gt(0), FINITE] = 1e-5
    """AdamW learning rate of the discriminator's own optimizer."""
    weight_decay: Annotated[float, Ge(0), FINITE] = 0.0
    """AdamW weight decay."""
    update_period: Positive = 1
    """Train every `update_period` optimizer steps of the policy (step % update_period == 0)."""
    update_epochs: Positive = 1
    """Passes over one step's examples per update."""
    train_batch_size: Positive = 8
    """Examples per discriminator optimizer step."""
    max_grad_norm: Annotated[float, Ge(0), FINITE] = 1.0
    """Gradient-norm clip of the discriminator's updates; 0 = off."""
    score_transform: Literal["logit", "prob", "log_prob"] = "logit"
    """What score() returns from the logit z = log D / (1 - D): "logit" (z, AIRL-style), "prob"
    (sigmoid z) or "log_prob" (log sigmoid z = log D, GAIL's reward)."""
    seed: Annotated[int, Ge(0)] = 0
    """Seed of the example shuffling (combined with the step, so resuming replays the same order)."""

    def __post_init__(self) -> None:
        check_fields(self, "discriminator", DiscriminatorError)
        if self.kind == "polar" and self.template is not None:
            raise DiscriminatorError(
                "discriminator.template: the polar kind has POLAR's own input format; leave it unset"
            )
        if self.template is not None:
            fields = template_fields(self.template)
            if self.kind == "online" and "reference" in fields:
                raise DiscriminatorError(
                    "discriminator.template: the online kind must not use {reference}: its real examples are "
                    "the references themselves, so it would learn to detect copies; remove it from the template"
                )
