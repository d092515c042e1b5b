"""Megatron-core on a machine without CUDA (tests, CI, laptops).

Megatron-core assumes CUDA in many small places: buffers created on
``torch.cuda.current_device()``, ``.cuda()`` calls, ``device="cuda"`` literals, CUDA RNG
trackers, streams and events. This module answers each of them on the CPU, so the real
Megatron code paths (TP, SP, PP, DP, distributed optimizer, dist-checkpointing) run over gloo.

It is inert where CUDA is present: :func:`install` returns without touching anything.
Written against megatron-core 0.16.x (see pyproject); re-check it when that pin moves.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "CUDA device N" to torch.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # page-locking needs an accelerator's allocator
            kwargs["pin_memory"] = False
        name = getattr(func, "__name__", "")
        if name in ("cuda", "pin_memory") and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if name == "record_stream":
            return None
        if name == "to" and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _FakeStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> "_FakeEvent":
        return _FakeEvent()

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "_FakeStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _FakeEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # A device object, not 0: `device=torch.cuda.current_device()` then means CPU even where the mode below
    # is not on the stack (modes are per thread; autograd runs some backward functions on its own threads).
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _FakeStream()
    cuda.default_stream = lambda *a, **k: _FakeStream()
    cuda.Stream = _FakeStream
    cuda.Event = _FakeEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_device = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    # The "CUDA" RNG becomes the CPU RNG: trackers fork and restore it like they would on a GPU.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()

    # The MoE all-to-all dispatcher turns split sizes into numpy only for CUDA tensors; gloo needs lists.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def _to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = _to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _to_cpu

    # The fallback (non-apex) optimizer compares param.type() with "torch.cuda.*Tensor".
    from megatron.core.optimizer import optimizer as mopt

    _orig_type = torch.Tensor.type

    @functools.wraps(_orig_type)
    def _cuda_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = _orig_type(self, *args, **kwargs)
        if (
            not args
            and not kwargs
            and isinstance(out, str)
            and out.startswith("torch.")
            and not out.startswith("torch.cuda.")
        ):
            return out.replace("torch.", "torch.cuda.", 1)
        return out

    mopt.torch.Tensor.type = _cuda_type  # type: ignore[method-assign]


class _HostCopies(TorchFunctionMode):
    """While HybridDeviceOptimizer sorts parameters into device and host groups: the model's tensors count as
    device tensors and the ``.cpu()`` copies it makes of them as host tensors.

    Without this every parameter already reads ``is_cuda == False``, so none is offloaded (the threshold is
    a fraction of the "GPU" numel, 0) and all land in its CPU optimizer without the host-copy bookkeeping
    that its step then looks up (a KeyError). With it the real offload path runs: host copies, gradient
    copies into them, the CPU optimizer's step, and the copy back into the model's weights.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.is_cuda:
            return not getattr(args[0], "_uniapl_host_copy", False)
        out = func(*args, **kwargs)
        if not torch.is_tensor(out):
            return out
        if getattr(func, "__name__", "") == "cpu":
            if out is args[0]:  # .cpu() of a CPU tensor is itself: the copy must be a tensor of its own
                out = out.clone()
            out._uniapl_host_copy = True
        elif any(getattr(t, "_uniapl_host_copy", False) for t in args if torch.is_tensor(t)):
            out._uniapl_host_copy = True  # what is derived from a host copy (its fp32 version) stays on the host
        return out


def _patch_hybrid_optimizer() -> None:
    from megatron.core.optimizer.cpu_offloading import hybrid_optimizer as hybrid

    cls = hybrid.HybridDeviceOptimizer
    orig = cls._get_sub_optimizer_param_groups

    @functools.wraps(orig)
    def split(self: Any, offload_fraction: float) -> Any:
        with _HostCopies():
            return orig(self, offload_fraction)

    cls._get_sub_optimizer_param_groups = split


def _patch_uneven_all_gather() -> None:
    """gloo's all_gather needs equal shapes; NCCL (and Megatron's MoE token gather over TP) does not."""
    import torch.distributed as dist

    orig = dist.all_gather

    @functools.wraps(orig)
    def all_gather(tensor_list: list, tensor: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
        shapes = {tuple(t.shape) for t in tensor_list}
        if len(shapes) == 1 and tuple(tensor.shape) in shapes:
            return orig(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        pad = tensor.new_zeros((rows, *tensor.shape[1:]))
        pad[: tensor.shape[0]] = tensor
        bufs = [torch.empty_like(pad) for _ in tensor_list]
        orig(bufs, pad, group=group)
        for out, buf in zip(tensor_list, bufs):
            out.copy_(buf[: out.shape[0]])
        return None

    dist.all_gather = all_gather


def install() -> bool:
    """Make Megatron-core usable on CPU. Returns True when the shim is active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    _patch_torch_cuda()
    _CudaToCpu().__enter__()  # stays on the mode stack for the life of the process
    _patch_megatron()
    _patch_hybrid_optimizer()
    _patch_uneven_all_gather()
    _INSTALLED = True
    return True
