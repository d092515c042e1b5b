"""The data layer: JSONL readers with validation, chat formatting, sequence packing, micro-batch
planning and the mixed-batch sampler. See each module's docstring; schemas are in schema.py."""

from uniapl_megatron.data.chat import ChatFormatter, formatter_from_config, load_tokenizer, qwen3_tokenizer_dir
from uniapl_megatron.data.config import DataConfig
from uniapl_megatron.data.microbatch import MicroBatchPlan, pack_rank, plan_micro_batches
from uniapl_megatron.data.packing import (
    PackedBatch,
    aligned_length,
    pack_sequences,
    required_pad_multiple,
    row_pad_multiple,
)
from uniapl_megatron.data.readers import Dataset, Demo, RLPrompt, read_demos, read_prompts
from uniapl_megatron.data.report import BadLine, DataError, ReadReport
from uniapl_megatron.data.sampler import MixedBatch, MixedBatchSampler

__all__ = [
    "BadLine",
    "ChatFormatter",
    "DataConfig",
    "DataError",
    "Dataset",
    "Demo",
    "MicroBatchPlan",
    "MixedBatch",
    "MixedBatchSampler",
    "PackedBatch",
    "RLPrompt",
    "ReadReport",
    "aligned_length",
    "formatter_from_config",
    "load_tokenizer",
    "pack_rank",
    "pack_sequences",
    "plan_micro_batches",
    "qwen3_tokenizer_dir",
    "read_demos",
    "read_prompts",
    "required_pad_multiple",
    "row_pad_multiple",
]
