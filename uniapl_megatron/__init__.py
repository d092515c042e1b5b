"""uniapl_megatron: UniAPL post-training (SFT + GRPO + adversarial term) on Megatron-core."""

__version__ = "0.1.0"

import warnings as _warnings

# Megatron announces each missing optional GPU library at import; on CPU machines that is expected.
_warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed.*")
