"""uniapl_megatron: UniAPL post-training (SFT + GRPO + adversarial term) on Megatron-core."""

__version__ = "0.1.0"
