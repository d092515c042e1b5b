"""A rollout engine without vLLM: our own Qwen3 decoder (qwen3_decoder.py) and batched decode loop.

Prompts x n samples are decoded together (left-padded) over a static KV cache; sampling is our own
(sampling.py: temperature, top-k, top-p, a counter-based per-sample RNG), so a sample depends only on its
seed. With rollout.compile_decode the one-token step (forward + sampling) is one compiled graph, replayed as a
CUDA graph on GPU. Weights come from the same (HF name, tensor) iterator the vLLM engine takes.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .base import EngineBase, RolloutBatch, Sample, SamplingParams, register_engine
from .config import RolloutConfig, resolve_device
from .digest import product
from .qwen3_decoder import build_decoder
from .sampling import base_seed, check_request, sample_next, sample_seed, seed_tensor
from .weight_sync import NamedTensor, SyncStats, WeightsSource, WeightSyncError, nbytes

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE_ROUND = 64  # cache lengths are rounded up so a compiled decode step is reused across calls
_STOP_CHECK_EVERY = 8  # decode steps between checks that every row has stopped


def iter_safetensors(folder: str | Path) -> Iterable[NamedTensor]:
    """(name, tensor) pairs of every *.safetensors file in a folder, one tensor in memory at a time."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"rollout.model_path: no *.safetensors in {folder} (use load_format 'dummy' to start from random weights)"
        )
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


@register_engine("torch")
class TorchRolloutEngine(EngineBase):
    """RolloutEngine on our Qwen3 decoder with a static KV cache and our own sampler."""

    verifies_weights = True

    @classmethod
    def check_colocated(cls, config: RolloutConfig) -> None:
        """One engine per rank: no tensor parallelism."""
        from .placement import PlacementError

        if config.tensor_parallel_size != 1:
            raise PlacementError(
                f"rollout.tensor_parallel_size={config.tensor_parallel_size}: the torch engine has "
                f"no tensor parallelism; use 1 (one engine per rank) or rollout.engine: vllm"
            )

    def __init__(self, config: RolloutConfig) -> None:
        from transformers import AutoConfig

        self.config = config
        self.device = torch.device(resolve_device(config.device))
        if not (Path(config.model_path) / "config.json").is_file():
            raise FileNotFoundError(f"rollout.model_path: {Path(config.model_path) / 'config.json'} not found")
        self.hf_config = AutoConfig.from_pretrained(config.model_path)
        self.vocab_size: int = self.hf_config.vocab_size
        self.dtype = _DTYPES[config.dtype]
        self.model = build_decoder(
            self.hf_config, self.dtype, self.device, random=config.load_format == "dummy", seed=config.seed
        )
        self._params: dict[str, torch.Tensor] = {}
        self._index_tensors()
        self._cache_key: tuple[int, int] | None = None
        self._step_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._decode_step
        if config.compile_decode:
            # One graph per (batch, cache length, sampling params); CUDA graphs on GPU ("reduce-overhead").
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._step_fn = torch.compile(self._decode_step, mode=mode, fullgraph=True, dynamic=False)
        self._weights_source: WeightsSource | None = None
        self._asleep = False
        self.last_sync = SyncStats()
        if config.load_format == "auto":
            loaded = self._load(iter_safetensors(config.model_path))
            missing = [n for n, t in self._params.items() if t.data_ptr() not in loaded]
            if missing:
                raise WeightSyncError(
                    f"{config.model_path}: the safetensors lack {len(missing)} weight(s) of the "
                    f"model, e.g. {', '.join(missing[:4])}"
                )

    # ---- weights ----------------------------------------------------------------------------------------
    def _index_tensors(self) -> None:
        # Weights by HF name (views into fused ones; a tied head under both names); rebuilt after moves.
        self._params = self.model.hf_tensors()

    def update_weights(self, named_tensors: Iterable[NamedTensor] | WeightsSource) -> None:
        """Copy HF-named tensors into the model in place (names and shapes checked). A callable is kept.
        A sleeping engine first takes its weights back to the device (as vLLM's does)."""
        self.wake()
        if callable(named_tensors):
            self._weights_source = named_tensors
            named_tensors = named_tensors()
        self._load(named_tensors)

    @torch.no_grad()
    def _load(self, named_tensors: Iterable[NamedTensor]) -> set[int]:
        """Copy in place; returns the data pointers written (tied weights share one)."""
        stats, written = SyncStats(), set()
        for name, t in named_tensors:
            target = self._params.get(name)
            if target is None:
                raise WeightSyncError(
                    f"update_weights: {name!r} is not a weight of the rollout model ({type(self.model).__name__})"
                )
            if tuple(target.shape) != tuple(t.shape):
                raise WeightSyncError(
                    f"update_weights: {name} has shape {tuple(t.shape)}, the rollout model "
                    f"expects {tuple(target.shape)}"
                )
            target.copy_(t, non_blocking=True)
            written.add(target.data_ptr())
            stats.tensors += 1
            stats.bytes += nbytes(t)
        if stats.tensors == 0:
            raise WeightSyncError("update_weights: the iterator yielded no tensors")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_sync = stats
        return written

    @torch.no_grad()
    def weight_digests(self) -> dict[str, tuple[torch.Tensor, bool]]:
        """{HF name: (digest v, read)} of the weights the model holds now (rollout/digest.py)."""
        return {name: (product(t).cpu(), True) for name, t in self._params.items()}

    # ---- generation -------------------------------------------------------------------------------------
    def _decode_step(
        self,
        prev: torch.Tensor,
        last_position: torch.Tensor,
        last_slot: torch.Tensor,
        step: torch.Tensor,
        pads: torch.Tensor,
        seeds: torch.Tensor,
        params: SamplingParams,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode step `step` (a device tensor, so one graph serves every step): feed the token sampled at
        step-1 at position last_position + step (slot last_slot + step), then sample token `step`."""
        logits = self.model(prev[:, None], (last_position + step)[:, None], last_slot + step, pads)
        return sample_next(logits, params, seeds, step)

    def _ensure_cache(self, batch: int, length: int) -> None:
        """A KV cache for `batch` rows of at least `length` slots; reused (not cleared: the mask hides stale
        slots) while the shape holds."""
        length = -(-length // _CACHE_ROUND) * _CACHE_ROUND
        if self._cache_key != (batch, length):
            self.model.release_cache()
            gc.collect()
            self.model.allocate_cache(batch, length)
            self._cache_key = (batch, length)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """n samples per prompt, decoded in batches of rollout.max_batch_size rows."""
        check_request(prompts, params, self.vocab_size, self.config.max_model_len)
        if self._asleep:
            raise RuntimeError("generate: the engine is asleep; call wake() first")
        base = base_seed(params.seed)
        first = params.prompt_index_offset
        rows = [(i, sample_seed(base, first + i, j)) for i in range(len(prompts)) for j in range(params.n)]
        batch = RolloutBatch()
        step = self.config.max_batch_size
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            batch.samples.extend(
                self._generate_rows(
                    [list(prompts[i]) for i, _ in chunk], [s for _, s in chunk], [i for i, _ in chunk], params
                )
            )
        return batch

    @torch.no_grad()
    def _generate_rows(
        self, prompts: list[list[int]], seeds: list[int], owners: list[int], params: SamplingParams
    ) -> list[Sample]:
        dev, b, new = self.device, len(prompts), params.max_new_tokens
        plen = max(len(p) for p in prompts)
        self._ensure_cache(b, plen + new)
        pads = torch.tensor([plen - len(p) for p in prompts], device=dev)
        ids = torch.tensor([[0] * (plen - len(p)) + p for p in prompts], device=dev)
        positions = (torch.arange(plen, device=dev)[None, :] - pads[:, None]).clamp_(min=0)
        seed_t = seed_tensor(seeds, dev)
        stop = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=dev)
        last_position, last_slot = positions[:, -1].contiguous(), torch.tensor([plen - 1], device=dev)
        step = torch.zeros((), dtype=torch.long, device=dev)

        logits = self.model(ids, positions, torch.arange(plen, device=dev), pads)  # prefill, eager
        tokens = torch.empty(b, new, dtype=torch.long, device=dev)
        logprobs = torch.empty(b, new, dtype=torch.float32, device=dev)
        tokens[:, 0], logprobs[:, 0] = sample_next(logits, params, seed_t, step)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        lengths = torch.full((b,), new, dtype=torch.long, device=dev)
        for t in range(new):
            if t:
                step += 1
                if dev.type == "cuda" and self.config.compile_decode:
                    torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are copied out
                tokens[:, t], logprobs[:, t] = self._step_fn(
                    tokens[:, t - 1], last_position, last_slot, step, pads, seed_t, params
                )
            hit = torch.isin(tokens[:, t], stop) & ~done
            lengths = torch.where(hit, t + 1, lengths)
            done |= hit
            # Asking the device whether all rows stopped is a host sync: only every few steps, so the host
            # can queue the next steps meanwhile (rows past their stop are decoded but not returned).
            if t % _STOP_CHECK_EVERY == 0 and bool(done.all()):
                break
        stopped = done.tolist()
        out = []
        for r, (n, toks, lps) in enumerate(zip(lengths.tolist(), tokens.tolist(), logprobs.tolist())):
            out.append(
                Sample(
                    prompt_index=owners[r],
                    token_ids=toks[:n],
                    logprobs=lps[:n],
                    finish_reason="stop" if stopped[r] else "length",
                )
            )
        return out

    # ---- memory -----------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """GPU: weights to host memory and the KV cache freed. CPU: nothing to release."""
        if self.device.type == "cpu":
            log.debug("sleep: the torch engine on CPU has nothing to release")
            return
        self.model.release_cache()
        self._cache_key = None
        self.model.to("cpu").tie_weights()
        self._index_tensors()
        self._asleep = True
        torch.cuda.empty_cache()

    def wake(self) -> None:
        """GPU: weights back on the device (the KV cache is re-made by the next generate)."""
        if self.device.type == "cpu" or not self._asleep:
            return
        self.model.to(self.device).tie_weights()
        self._index_tensors()
        self._asleep = False

    def shutdown(self) -> None:
        """Free the model and cache; the torch engine starts no processes and writes no files."""
        if self.model is not None:
            self.model.release_cache()
        self.model = None  # type: ignore[assignment]
        self._params = {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
