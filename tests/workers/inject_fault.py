"""`uniapl train` with one fault injected into the vLLM engine (a stand-in for an engine bug), from $FAULT:
- temperature: the engine samples at 1.5x the temperature the trainer believes (sampling.temperature);
- weight: after the second weight sync, one weight inside the engine's own memory is altered."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from uniapl_megatron.cli import main
from uniapl_megatron.rollout.vllm_engine import VLLMRolloutEngine

ALTERED = "model.embed_tokens.weight"


def _alter(worker) -> None:
    with torch.no_grad():
        dict(worker.model_runner.get_model().named_parameters())[ALTERED][7, 3] += 0.05


def patch(fault: str) -> None:
    if fault == "temperature":
        generate = VLLMRolloutEngine.generate

        def hot(self, prompts, params):
            return generate(self, prompts, dataclasses.replace(params, temperature=params.temperature * 1.5))

        VLLMRolloutEngine.generate = hot
    elif fault == "weight":
        update, calls = VLLMRolloutEngine.update_weights, [0]

        def update_then_alter(self, named_tensors):
            update(self, named_tensors)
            calls[0] += 1
            if calls[0] == 2:
                self._llm.collective_rpc(_alter)

        VLLMRolloutEngine.update_weights = update_then_alter


if __name__ == "__main__":
    patch(os.environ["FAULT"])
    sys.exit(main(sys.argv[1:]))
