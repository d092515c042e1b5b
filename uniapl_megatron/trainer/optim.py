"""The student's optimizer: its settings (the ``optim`` section), Megatron's LR schedule over them, and the
helpers that keep the optimizer's state right across a checkpoint load and a stage switch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..models.arch import ConfigError
from ..models.qwen3 import ModelConfig
from ..parallel import ParallelConfig
from .overlap import OverlapMode


def _inner_optimizers(optimizer: Any) -> list[Any]:
    """Megatron's optimizer wrappers under ``optimizer`` (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def guard_te_version_check() -> None:
    """megatron-core 0.16.1's OptimizerConfig compares Transformer Engine's version unguarded under
    use_precision_aware_optimizer (which CPU offload uses); without TE the version is None and the
    comparison raises. No TE means no TE version is new enough."""
    from megatron.core import utils
    from megatron.core.optimizer import optimizer_config

    orig = utils.is_te_min_version
    optimizer_config.is_te_min_version = lambda version, check_equality=True: (
        utils.get_te_version() is not None and orig(version, check_equality)
    )


@dataclass
class OptimConfig:
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam (AdamW; decoupled weight decay) or sgd (tests compare gradients through it)."""
    lr: float = 1e-6
    """Peak learning rate (Adam)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay of the learning rate from lr to min_lr over the run's optimizer updates."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam's decay rate of the first moment (the gradient's running mean)."""
    adam_beta2: float = 0.999
    """Adam's decay rate of the second moment (the squared gradient's running mean)."""
    adam_eps: float = 1e-8
    """Added to the second moment's square root before dividing."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    chunk_tokens: int = 2048
    """Tokens per chunk of the vocab-parallel log-prob pass (bounds the logits memory)."""
    cpu_offload: bool = False
    """Keep optimizer state in host memory and run the optimizer step there (Megatron-core's
    HybridDeviceOptimizer, OptimizerConfig.optimizer_cpu_offload). Frees 8 bytes per trainable parameter
    (divided by DP) of GPU memory — Adam's two fp32 moments — and costs a device->host copy of the fp32
    gradients, a host->device copy of the updated fp32 weights and a CPU Adam step every optimizer step.
    Needs parallel.use_distributed_optimizer (the only Megatron optimizer wrapper that handles it) and
    model.dtype bf16 or fp16."""
    cpu_offload_fraction: float = 1.0
    """Share of this rank's optimizer state offloaded, in (0, 1] (OptimizerConfig.optimizer_offload_fraction;
    parameters are taken in order until the share is reached, the rest stay on the GPU)."""
    cpu_offload_overlap: bool = False
    """One CPU optimizer per parameter on side streams, so copies overlap the CPU step
    (OptimizerConfig.overlap_cpu_optimizer_d2h_h2d)."""
    overlap_comm: OverlapMode = "auto"
    """Overlap data-parallel communication with compute (Megatron DDP): overlap_grad_reduce reduces each
    gradient bucket as soon as the last micro-batch's backward fills it; overlap_param_gather (distributed
    optimizer) all-gathers the updated weights bucket by bucket during the next forward, and weight sync / export
    / checkpoints finish that gather first. auto: on at data-parallel (x context-parallel) size > 1 on GPUs, off
    on CPU (gloo overlaps nothing) and at DP 1; on: also without a GPU; off: never. Gradient overlap stays off
    when TP exceeds the KV heads (their replicated gradients are summed after backward)."""

    def validate(self, parallel: ParallelConfig, model: ModelConfig) -> None:
        """Stop at start-up, naming the field, on combinations Megatron would reject later or mid-step."""
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optim.optimizer={self.optimizer!r}: expected adam or sgd")
        if self.optimizer == "sgd" and parallel.use_distributed_optimizer:
            raise ConfigError(
                "optim.optimizer=sgd needs parallel.use_distributed_optimizer=false (Megatron-core's "
                "distributed optimizer takes Adam only)"
            )
        if self.chunk_tokens < 1:
            raise ConfigError(f"optim.chunk_tokens={self.chunk_tokens} must be >= 1")
        if not self.cpu_offload:
            return
        if not parallel.use_distributed_optimizer:
            raise ConfigError(
                "optim.cpu_offload=true needs parallel.use_distributed_optimizer=true: Megatron-core "
                "handles the offloaded optimizer's state and checkpoints only in its distributed "
                "optimizer"
            )
        if model.dtype == "fp32":
            # Megatron-core 0.16.1 hands the offloading optimizer fp32 weights as views of the model's
            # weights, which torch refuses to optimise ("can't optimize a non-leaf Tensor"); bf16/fp16
            # weights get fp32 main copies, which work.
            raise ConfigError(
                "optim.cpu_offload=true needs model.dtype bf16 or fp16 (Megatron-core cannot offload "
                "the optimizer of fp32 weights)"
            )
        if not 0.0 < self.cpu_offload_fraction <= 1.0:
            raise ConfigError(
                f"optim.cpu_offload_fraction={self.cpu_offload_fraction} must be in (0, 1] (0 would offload nothing)"
            )


def lr_scheduler(optimizer: Any, o: OptimConfig, total_steps: int) -> Any:
    """Megatron's LR (and weight-decay) schedule of ``o`` over ``total_steps`` optimizer updates, starting
    at update 0 (it sets the optimizer's learning rate for the first update)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(total_steps, o.warmup_steps + 1),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def restore_adam_step(optimizer: Any, num_updates: int) -> None:
    """Adam's per-parameter step count (its bias correction) after a load: Megatron's sharded optimizer
    state does not carry it through torch's AdamW fallback, so it is set from the scheduler's count."""
    for opt in _inner_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if "step" in state:
                step = state["step"]
                state["step"] = torch.full_like(step, float(num_updates)) if torch.is_tensor(step) else num_updates


def reset_optimizer_state(optimizer: Any) -> None:
    """Adam's moments to zero and its step count to 0: the next update is a fresh Adam's first."""
    with torch.no_grad():
        for opt in _inner_optimizers(optimizer):
            inner = getattr(opt, "optimizer", opt)
            for state in inner.state.values():
                for key, value in state.items():
                    if key == "step":
                        state[key] = torch.zeros_like(value) if torch.is_tensor(value) else 0
                    elif torch.is_tensor(value):
                        value.zero_()


def optimizer_classes(optimizer: Any) -> list[type]:
    """Optimizer classes Megatron's HybridDeviceOptimizer (optim.cpu_offload) keeps in its param groups, so a
    checkpoint it wrote names them: torch's and Transformer Engine's, and the ones this run uses."""
    out = {torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD}
    try:
        from transformer_engine.pytorch.optimizers import FusedAdam, FusedSGD

        out |= {FusedAdam, FusedSGD}
    except ImportError:
        pass
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        out |= {
            c
            for c in (getattr(inner, "cpu_optimizer_cls", None), getattr(inner, "gpu_optimizer_cls", None))
            if isinstance(c, type)
        }
    return list(out)


@contextlib.contextmanager
def fully_reshardable_torch_adam(optimizer: Any) -> Iterator[None]:
    """megatron-core 0.16.1's fully_reshardable load copies every key of a parameter's optimizer state from
    the checkpoint, but torch's AdamW (the fallback without TE / apex) keeps a per-parameter ``step`` there
    that the checkpoint does not hold as a tensor (KeyError 'step'). During the load each ``step`` is set
    aside around that copy and put back (Student.load_state_dict then sets it from the scheduler's count)."""
    patched = []
    for opt in _inner_optimizers(optimizer):
        orig = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if orig is None or getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            continue

        def set_states(model_param: Any, tensors: dict, opt: Any = opt, orig: Any = orig) -> None:
            group, order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
            step = state.pop("step", None)
            try:
                orig(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states  # this instance only, for this load
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
