"""Methods mixed into vLLM's worker class (vLLM's `worker_extension_cls`), reached through collective_rpc.

They run wherever vLLM's workers run: in the trainer's process (in-process / external launcher) or in
vLLM's own worker processes (multiprocess mode, disaggregated rollout). Imported by qualified name, so
this module must stay importable without side effects.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from .weight_sync import NamedTensor, WeightChannel, WeightSyncError, nbytes, receive_weights


def load_named_tensors(worker: Any, named_tensors: Iterable[NamedTensor]) -> tuple[int, int]:
    """Load HF-named tensors into a vLLM worker's model; returns (tensors, bytes).

    CPU: vLLM's reload_weights (the CPU kernels repack linear weights, so a plain load_weights would write
    into repacked tensors). GPU: the model's load_weights, as RL frameworks do.
    """
    from vllm.config import set_current_vllm_config

    count = [0, 0]
    last: list[str | None] = [None]

    def counted() -> Iterator[NamedTensor]:
        for name, t in named_tensors:
            last[0] = f"{name} {tuple(t.shape)} {t.dtype}"
            count[0] += 1
            count[1] += nbytes(t)
            yield name, t

    try:
        with torch.no_grad(), set_current_vllm_config(worker.vllm_config):
            if worker.device.type == "cpu":
                worker.model_runner.reload_weights(weights_iterator=counted())
            else:
                worker.model_runner.get_model().load_weights(weights=counted())
    except WeightSyncError:
        raise
    except Exception as e:  # noqa: BLE001 - vLLM raises KeyError/AssertionError without naming the tensor
        raise WeightSyncError(f"vLLM could not load the weights (last tensor read: {last[0]}): "
                              f"{type(e).__name__}: {e}") from e
    return count[0], count[1]


class WeightSyncExtension:
    """`self` is vLLM's worker (it has vllm_config, device, model_runner, rank)."""

    _uniapl_channel: WeightChannel | None = None

    def uniapl_load(self, named_tensors: Iterable[NamedTensor]) -> tuple[int, int]:
        """In-process load (the iterator is passed by reference, never serialised)."""
        return load_named_tensors(self, named_tensors)

    def uniapl_open_channel(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                            timeout_s: float = 600.0) -> None:
        """Join the broadcast group as rank `rank_offset + this worker's rank`."""
        self.uniapl_close_channel()
        device = self.device if backend == "nccl" else torch.device("cpu")
        self._uniapl_channel = WeightChannel(host, port, rank_offset + self.rank, world_size, backend, device,
                                             timeout_s)

    def uniapl_receive(self, src: int = 0) -> tuple[int, int]:
        """Load one whole sync broadcast by rank `src` of the channel."""
        if self._uniapl_channel is None:
            raise WeightSyncError("no weight channel: connect the engine to the sender first")
        return load_named_tensors(self, receive_weights(self._uniapl_channel, src))

    def uniapl_close_channel(self) -> None:
        if self._uniapl_channel is not None:
            self._uniapl_channel.close()
            self._uniapl_channel = None
