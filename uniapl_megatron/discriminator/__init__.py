"""Discriminators: score each rollout against the teacher's answer (frozen or trained online)."""

from __future__ import annotations

from uniapl_megatron.discriminator.base import (
    CANDIDATE_TEMPLATE,
    REFERENCE_TEMPLATE,
    Discriminator,
    DiscriminatorError,
    TrainableDiscriminator,
)
from uniapl_megatron.discriminator.config import DiscriminatorConfig
from uniapl_megatron.discriminator.frozen import FrozenDiscriminator
from uniapl_megatron.discriminator.hf_scorer import VALUE_HEAD_FILE, HFScorer
from uniapl_megatron.discriminator.online import OnlineDiscriminator
from uniapl_megatron.discriminator.polar import PolarDiscriminator


def build_discriminator(cfg: DiscriminatorConfig) -> FrozenDiscriminator | OnlineDiscriminator | PolarDiscriminator:
    """The discriminator ``cfg.kind`` names, loaded from ``cfg.path``."""
    if cfg.kind == "online":
        return OnlineDiscriminator.from_config(cfg)
    if cfg.kind == "polar":
        return PolarDiscriminator.from_config(cfg)
    return FrozenDiscriminator.from_config(cfg)


__all__ = [
    "CANDIDATE_TEMPLATE",
    "REFERENCE_TEMPLATE",
    "VALUE_HEAD_FILE",
    "Discriminator",
    "DiscriminatorConfig",
    "DiscriminatorError",
    "FrozenDiscriminator",
    "HFScorer",
    "OnlineDiscriminator",
    "PolarDiscriminator",
    "TrainableDiscriminator",
    "build_discriminator",
]
