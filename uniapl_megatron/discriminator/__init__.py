"""Discriminators: score each rollout against the teacher's answer (frozen or trained online)."""

from __future__ import annotations

from uniapl_megatron.discriminator.base import (
    CANDIDATE_TEMPLATE,
    DISCRIMINATORS,
    REFERENCE_TEMPLATE,
    Discriminator,
    DiscriminatorBase,
    DiscriminatorError,
    TrainableDiscriminator,
    register_discriminator,
)
from uniapl_megatron.discriminator.config import DiscriminatorConfig
from uniapl_megatron.discriminator.frozen import FrozenDiscriminator
from uniapl_megatron.discriminator.hf_scorer import VALUE_HEAD_FILE, HFScorer
from uniapl_megatron.discriminator.online import OnlineDiscriminator
from uniapl_megatron.discriminator.polar import PolarDiscriminator


def build_discriminator(cfg: DiscriminatorConfig) -> Discriminator:
    """The discriminator registered as ``cfg.kind``, loaded from ``cfg.path``."""
    return DISCRIMINATORS.get(cfg.kind, "discriminator.kind").from_config(cfg)


__all__ = [
    "CANDIDATE_TEMPLATE",
    "DISCRIMINATORS",
    "REFERENCE_TEMPLATE",
    "VALUE_HEAD_FILE",
    "Discriminator",
    "DiscriminatorBase",
    "DiscriminatorConfig",
    "DiscriminatorError",
    "FrozenDiscriminator",
    "HFScorer",
    "OnlineDiscriminator",
    "PolarDiscriminator",
    "TrainableDiscriminator",
    "build_discriminator",
    "register_discriminator",
]
