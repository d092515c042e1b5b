"""The student on Megatron-core: model chunks in DDP, the distributed optimizer, the LR schedule, and the
two passes the trainer needs — log-probs (no grad) and a training step over packed micro-batches.

Loss contract (NeMo-RL style): the loss callback returns each micro-batch's share of the step's loss,
already divided by the step's *global* counts. Megatron is told so (``calculate_per_token_loss``): it
neither divides by the number of micro-batches nor averages gradients over data-parallel ranks, it sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..convert.params import high_precision_state_dict, iter_hf_tensors, load_from_hf, unwrap
from ..convert.safetensors_io import SafetensorsFolder
from ..data.packing import PackedBatch
from ..distributed import collective_device
from ..models.arch import Qwen3Arch
from ..models.qwen3 import ModelConfig, build_model, check_fp8_training, padded_vocab_size
from ..objective import LossInputs, sum_metrics
from ..parallel import ParallelConfig
from .grad_norm import count_kv_copies_once, replica_groups, step_unless_nonfinite
from .logprobs import LogprobHead
from .optim import OptimConfig, fully_reshardable_torch_adam, guard_te_version_check, lr_scheduler, restore_adam_step
from .overlap import decide_overlap, wire_overlap


@dataclass
class MicroBatch:
    """One packed row and what the loss needs besides the forward pass's outputs (all [T] tensors aligned with
    the logits)."""

    packed: PackedBatch
    inputs: LossInputs | None = None
    """The loss's per-sequence and per-token inputs, without the log-probs (the loss callback adds them with
    LossInputs.with_outputs); None for a pass that computes no loss."""
    temperature: torch.Tensor | None = None
    """[1, T] temperature of each target's log-prob (demos at 1, rollouts at the sampler's); None: the
    temperature the pass is called with, for every token."""


class Student:
    """This rank's part of the student, trainable (``train=True``) or frozen (reference model)."""

    def __init__(
        self,
        arch: Qwen3Arch,
        parallel: ParallelConfig,
        model_cfg: ModelConfig,
        optim: OptimConfig | None = None,
        total_steps: int = 1,
        num_query_groups: int | None = None,
    ) -> None:
        from megatron.core import parallel_state as ps

        self.arch, self.parallel, self.model_cfg = arch, parallel, model_cfg
        self.num_query_groups = num_query_groups or parallel.num_query_groups(arch)
        self.train = optim is not None
        self.optim_cfg = optim or OptimConfig()
        if self.train:
            self.optim_cfg.validate(parallel, model_cfg)
        chunks = build_model(arch, parallel, model_cfg, initialize=False, num_query_groups=self.num_query_groups)
        self.padded_vocab = padded_vocab_size(
            arch.vocab_size, model_cfg.make_vocab_size_divisible_by, parallel.tensor_model_parallel_size
        )
        self.config = chunks[0].config
        self.config.calculate_per_token_loss = True
        self.config.variable_seq_lengths = True  # packed rows differ in length; PP sends shapes first
        if parallel.virtual_pipeline_model_parallel_size:
            # Interleaved, a stage sends to and receives from the same neighbour in both directions (at PP 2
            # both neighbours are one rank); batched P2P would pair a gradient with an activation. Megatron's
            # separate sends/receives keep the directions apart, as Megatron-LM uses them with VPP.
            self.config.batch_p2p_comm, self.config.overlap_p2p_comm = False, True
        self.heads = [LogprobHead(c, arch.vocab_size, self.optim_cfg.chunk_tokens) for c in chunks if c.post_process]
        if self.train:
            self.chunks, self.optimizer, self.scheduler = self._make_trainable(chunks, total_steps)
        else:
            for c in chunks:
                c.requires_grad_(False)
            self.chunks, self.optimizer, self.scheduler = chunks, None, None
        self.pp_last = ps.is_pipeline_last_stage(ignore_virtual=True)

    # ---- construction -------------------------------------------------------------------------------

    def _replicated_kv(self, chunks: list) -> tuple[list, tuple[int, int], Any]:
        """TP above the model's KV heads gives every TP rank its own copy of a KV head (num_query_groups = TP,
        one group per rank): this rank's ``linear_qkv`` weights, the [start, end) rows of their K and V
        heads, and the group of ranks holding the same head (None when nothing is replicated)."""
        from megatron.core import parallel_state as ps

        tp, kv = self.parallel.tensor_model_parallel_size, self.arch.num_kv_heads
        if self.num_query_groups == kv or tp == 1:
            return [], (0, 0), None
        hd = self.arch.head_dim
        q_rows = self.arch.num_heads // self.num_query_groups * hd  # one local group: its q heads, then k, v
        params = [p for c in chunks for n, p in c.named_parameters() if n.endswith("self_attention.linear_qkv.weight")]
        return params, (q_rows, q_rows + 2 * hd), replica_groups(ps.get_tensor_model_parallel_group(), kv)

    @staticmethod
    def _kv_grad_sync(params: list, rows: tuple[int, int], group: Any) -> Callable[[], None]:
        """Sum the K/V rows of linear_qkv's gradient over the ranks sharing the head; otherwise the copies
        drift apart after the first update and no longer equal one HF head."""

        def sync() -> None:
            for p in params:
                grad = getattr(p, "main_grad", None)
                if grad is not None:
                    torch.distributed.all_reduce(
                        grad[rows[0] : rows[1]], op=torch.distributed.ReduceOp.SUM, group=group
                    )

        return sync if group is not None else lambda: None

    def _optimizer_config(self) -> Any:
        """Megatron's OptimizerConfig from the run's optimizer settings and the model's parameter dtype."""
        from megatron.core.optimizer import OptimizerConfig

        o, dtype = self.optim_cfg, self.config.params_dtype
        return OptimizerConfig(
            optimizer=o.optimizer,
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=self.parallel.use_distributed_optimizer,
            optimizer_cpu_offload=o.cpu_offload,
            optimizer_offload_fraction=o.cpu_offload_fraction,
            overlap_cpu_optimizer_d2h_h2d=o.cpu_offload_overlap,
            # Offload through the precision-aware path: the hybrid optimizer then owns the fp32 master weights
            # (one copy, on the host) and its checkpoint state loads back (without it 0.16.1's load looks the
            # main shards up in an empty fp32-copy table, a KeyError).
            use_precision_aware_optimizer=o.cpu_offload,
        )

    def _make_trainable(self, chunks: list, total_steps: int) -> tuple[list, Any, Any]:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import get_megatron_optimizer

        o = self.optim_cfg
        guard_te_version_check()
        check_fp8_training(self.model_cfg, self.parallel)
        overlap = decide_overlap(
            o.overlap_comm,
            ps.get_data_parallel_world_size(with_context_parallel=True),
            torch.cuda.is_available(),
            self.parallel.use_distributed_optimizer,
            replicated_kv=self.num_query_groups != self.arch.num_kv_heads
            and self.parallel.tensor_model_parallel_size > 1,
        )
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap.grad_reduce,
            overlap_param_gather=overlap.param_gather,
            use_distributed_optimizer=self.parallel.use_distributed_optimizer,
            check_for_nan_in_grad=False,
            average_in_collective=False,
            # FP8 weights (model.fp8_param) are all-gathered as FP8 by the distributed optimizer.
            fp8_param_gather=self.model_cfg.fp8_param,
        )
        wrapped = [
            DistributedDataParallel(config=self.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        wire_overlap(wrapped, self.config, overlap)
        kv_params, kv_rows, kv_group = self._replicated_kv(chunks)
        sync_kv = self._kv_grad_sync(kv_params, kv_rows, kv_group)

        def finalize(model: list, num_tokens: Any = None, **kw: Any) -> None:
            sync_kv()
            # Losses arrive pre-normalised by global counts: finalize must not rescale by a token count.
            finalize_model_grads(model, None)

        self.config.finalize_model_grads_func = finalize
        opt = get_megatron_optimizer(self._optimizer_config(), wrapped)
        sched = lr_scheduler(opt, o, total_steps)
        if kv_group is not None:
            count_kv_copies_once(opt, kv_params, kv_rows, is_copy=kv_group.rank() != 0)
        return wrapped, opt, sched

    def load_hf(self, hf_dir: str) -> None:
        """Weights straight from a HF safetensors folder (no conversion step needed)."""
        src = SafetensorsFolder(hf_dir)
        # FP8 weights hold a rounded copy: the fp32 master weights start from the file's values instead.
        kept = {} if self.model_cfg.fp8_param and self.optimizer is not None else None
        load_from_hf(
            [unwrap(c) for c in self.chunks], self.arch, src.get, self.num_query_groups, self.padded_vocab, keep=kept
        )
        self._refresh_main_params(high_precision_state_dict(self.chunks, kept) if kept else None)

    def copy_weights_from(self, other: "Student") -> None:
        with torch.no_grad():
            for a, b in zip(self.chunks, other.chunks):
                for pa, pb in zip(unwrap(a).parameters(), unwrap(b).parameters()):
                    pa.copy_(pb)
        self._refresh_main_params()

    def _refresh_main_params(self, state_dict: dict[str, Any] | None = None) -> None:
        # fp32 main copies of bf16 weights (and DDP's param buffers) must follow loaded weights.
        if self.optimizer is not None and hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params(state_dict)

    # ---- state (what a trainer checkpoint holds of the student; trainer/checkpoint.py writes it) ------------

    def load_megatron(self, folder: str | Path) -> None:
        """Weights from a Megatron distributed checkpoint (tools/convert_hf.py import, or a trainer checkpoint's
        folder): model only, at this rank's layout; refused when its KV-head grouping differs from this one."""
        from ..convert.checkpoint import load_model, read_meta

        meta = read_meta(folder)
        if meta["num_query_groups"] != self.num_query_groups:
            raise ValueError(f"{folder}: KV groups {meta['num_query_groups']} != this layout's {self.num_query_groups}")
        load_model([unwrap(c) for c in self.chunks], Path(folder) / "model")
        self._refresh_main_params()

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint's uniapl_checkpoint.json says of the model, so that `export` and load_megatron read it."""
        return {
            "dtype": self.model_cfg.dtype,
            "num_query_groups": self.num_query_groups,
            "make_vocab_size_divisible_by": self.model_cfg.make_vocab_size_divisible_by,
            "arch": self.arch.to_dict(),
        }

    def sharded_state_dict(self, optim_format: str, is_loading: bool = False) -> dict[str, Any]:
        """Model and optimizer as Megatron sharded state (a distributed checkpoint's ``model/`` folder), the
        distributed optimizer's in ``optim_format`` (checkpoint.OPTIM_FORMATS). For a load, the optimizer's
        state is created first: its sharded state dict can describe only state that exists."""
        from ..convert.checkpoint import model_sharded_state_dict

        if is_loading:
            with torch.no_grad():
                for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                    if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
                        opt._init_optimizer_states_with_dummy_values()
        model = model_sharded_state_dict([unwrap(c) for c in self.chunks])
        metadata = {"distrib_optim_sharding_type": optim_format} if self.parallel.use_distributed_optimizer else None
        return {
            "model": model,
            "optimizer": self.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=metadata),
        }

    def load_sharded_state_dict(self, loaded: dict[str, Any]) -> None:
        """Model and optimizer from what Megatron loaded for :meth:`sharded_state_dict` (is_loading=True)."""
        with torch.no_grad():
            chunks = [unwrap(c) for c in self.chunks]
            for i, c in enumerate(chunks):
                c.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded["model"][f"model{i}"], strict=False)
            with fully_reshardable_torch_adam(self.optimizer):
                self.optimizer.load_state_dict(loaded["optimizer"])

    def state_dict(self) -> dict[str, Any]:
        """The student's state besides its tensors (JSON-able): the LR schedule."""
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The LR schedule, after the tensors: Adam's per-parameter step count (its bias correction) follows the
        schedule's update count, which Megatron's sharded state does not carry through torch's AdamW."""
        self.scheduler.load_state_dict(state["scheduler"])
        restore_adam_step(self.optimizer, self.scheduler.num_steps)

    # ---- passes -------------------------------------------------------------------------------------

    def _run(
        self,
        micro_batches: Sequence[MicroBatch],
        temperature: float,
        with_entropy: bool,
        loss_fn: Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict]] | None,
        only_loss_tokens: bool = True,
    ) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward_only = loss_fn is None
        outputs: list = []
        self._check_micro_batch_count(len(micro_batches))
        # One iterator per model chunk, each over the same micro-batches: the interleaved schedule runs
        # micro-batch j through chunk k at its own time, and each chunk's forward takes that chunk's next one.
        iters: list[Iterator[MicroBatch]] = [iter(micro_batches) for _ in self.chunks]

        def forward_step(data_iter: Iterator[MicroBatch], model: torch.nn.Module) -> tuple:
            mb = next(data_iter)
            p = mb.packed
            m = unwrap(model)
            if m.post_process:
                # A micro-batch with no trained token (a filler) runs the head on all its tokens: its zero loss
                # must reach the earlier pipeline stages through autograd, or they wait for a gradient forever.
                mask = p.loss_mask > 0 if only_loss_tokens and p.num_loss_tokens else None
                for head in self.heads:
                    if head.layer is m.output_layer:
                        head.targets = (
                            p.labels,
                            temperature if mb.temperature is None else mb.temperature,
                            with_entropy,
                            mask,
                        )
            out = model(p.input_ids, p.position_ids, attention_mask=None, packed_seq_params=p.to_packed_seq_params())

            def loss_func(output: torch.Tensor) -> tuple:
                flat = output[0]  # [T] or [T, 2]
                if forward_only:
                    outputs.append(flat.detach())
                    return flat.sum() * 0.0, 1, {}
                loss, metrics = loss_fn(mb, flat)
                outputs.append(metrics)
                return loss, 1, {}

            return out, loss_func

        for c in self.chunks:
            c.train(not forward_only)
        ctx = torch.no_grad() if forward_only else torch.enable_grad()
        with ctx:
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iters if len(iters) > 1 else iters[0],
                model=self.chunks,
                num_microbatches=len(micro_batches),
                seq_length=max(mb.packed.num_tokens for mb in micro_batches),
                micro_batch_size=1,
                forward_only=forward_only,
            )
        return outputs

    def _check_micro_batch_count(self, n: int) -> None:
        """The interleaved (VPP) schedule runs micro-batches in groups of PP; Megatron would stop mid-step."""
        multiple = self.parallel.micro_batch_multiple
        if n < 1:
            raise ValueError("no micro-batch to run: every rank needs at least one (a filler when it has no data)")
        if n % multiple:
            raise ValueError(
                f"{n} micro-batches: with parallel.virtual_pipeline_model_parallel_size="
                f"{self.parallel.virtual_pipeline_model_parallel_size} the interleaved schedule needs a "
                f"multiple of pipeline_model_parallel_size={multiple}; plan_micro_batches("
                f"micro_batch_multiple=ParallelConfig.micro_batch_multiple) packs such a count"
            )

    def logprobs(
        self,
        micro_batches: Sequence[MicroBatch],
        temperature: float = 1.0,
        with_entropy: bool = False,
        only_loss_tokens: bool = True,
    ) -> list[torch.Tensor] | None:
        """Per micro-batch [T] log-probs of ``labels`` (last pipeline stage; None elsewhere). With
        ``only_loss_tokens`` positions outside the loss mask are 0."""
        out = self._run(micro_batches, temperature, with_entropy, None, only_loss_tokens)
        return out if self.pp_last else None

    def train_step(
        self,
        micro_batches: Sequence[MicroBatch],
        loss_fn: Callable,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> dict[str, float]:
        """Forward/backward over the micro-batches, then one optimizer step. Returns the step's metrics
        summed over micro-batches (last stage) plus grad_norm / lr / skipped."""
        assert self.optimizer is not None, "a frozen Student cannot train"
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics_list = self._run(micro_batches, temperature, with_entropy, loss_fn)
        # A NaN/inf loss anywhere, or a NaN/inf gradient norm, skips the step on every rank: its gradients
        # are dropped and neither the optimizer nor the LR schedule moves.
        bad = torch.tensor(
            [float(any(not torch.isfinite(torch.as_tensor(v)).all() for m in metrics_list for v in m.values()))],
            device=collective_device(),
        )
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        ok, grad_norm = (
            (False, float("nan")) if bad.item() else step_unless_nonfinite(self.optimizer, self.optim_cfg.clip_grad)
        )
        if ok:
            self.scheduler.step(increment=1)
        else:
            self.skip_step()
        summed = sum_metrics(metrics_list)
        summed.update(grad_norm=grad_norm, lr=float(self.optimizer.param_groups[0]["lr"]), skipped=float(not ok))
        return summed

    def skip_step(self) -> None:
        """Drop the gradients of a skipped step (NaN/inf loss or gradient norm)."""
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()

    def hf_tensors(
        self, bucket_bytes: int = 0, track: Callable[[torch.Tensor], None] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every full HF-named tensor on every rank (collective): what rollout weight sync consumes. Streamed:
        one tensor's TP-gathered copies at a time, and with ``bucket_bytes`` the pipeline stages broadcast in
        buckets of that size (convert.params.iter_hf_tensors); no rank holds the whole model. ``track`` sees
        every tensor allocated for it (weight_sync.HeldBytes measures the sync's memory).

        With tied embeddings ``lm_head.weight`` is sent too: vLLM's CPU backend keeps its own (repacked)
        LM-head copy that loading the embedding alone leaves stale.
        """
        for name, t in iter_hf_tensors(
            [unwrap(c) for c in self.chunks], self.arch, self.num_query_groups, bucket_bytes, track
        ):
            yield name, t
            if self.arch.tie_word_embeddings and name == "model.embed_tokens.weight":
                yield "lm_head.weight", t
