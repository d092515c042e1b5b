"""The tiled vocab-parallel log-prob kernel against autograd through full float64 logits: values and gradients
(hidden and weight) of log-probs and entropy, at one temperature or one per token, at TP1 and TP2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from uniapl_megatron.launch import run_ranks
from uniapl_megatron.trainer import logprobs

WORKER = Path(__file__).resolve().parent / "workers" / "logprobs_tp.py"
N, H, V, TRUE_V = 13, 16, 304, 290  # 14 vocabulary padding rows, all on the last TP2 rank


def reference(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | torch.Tensor,
    with_entropy: bool,
    coef: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, d(output . coef)/dh, .../dw) through the full logits of the true vocabulary, in float64."""
    hd = h.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    t = temperature.double().unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    logp = torch.log_softmax(hd @ wd[:TRUE_V].t() / t, dim=-1)
    out = logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    if with_entropy:
        out = torch.stack([out, -(logp.exp() * logp).sum(-1)], dim=-1)
    (out * coef.double()).sum().backward()
    return out.detach(), hd.grad, wd.grad


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, TRUE_V, (N,), generator=g)
    labels[:2] = torch.tensor([3, TRUE_V - 1])  # one on each TP2 rank's slice at least
    return {
        "hidden": torch.randn(N, H, generator=g),
        "weight": torch.randn(V, H, generator=g) * 0.5,
        "labels": labels,
        "temperature": torch.rand(N, generator=g) + 0.4,
        "coef_float": torch.randn(N, generator=g),
        "coef_per_token": torch.randn(N, 2, generator=g),
        "true_vocab": torch.tensor(TRUE_V),
    }


def assert_matches(got: tuple, want: tuple, what: str, tol: float = 2e-5) -> None:
    for name, a, b in zip(("output", "hidden grad", "weight grad"), got, want):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m, name=name: f"{what}, {name}: {m}")


@pytest.mark.parametrize("with_entropy", [False, True])
def test_tp1_matches_full_logits(with_entropy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logprobs, "_BLOCK_VALUES", 5 * 64)  # 5-row chunks x 64-column tiles, ragged ends
    x = inputs()
    coef = x["coef_per_token"] if with_entropy else x["coef_float"]
    for temperature in (1.0, 0.7, x["temperature"]):
        h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
        out = logprobs.vocab_parallel_logprobs(
            h, w, x["labels"], true_vocab=TRUE_V, temperature=temperature, with_entropy=with_entropy, chunk_tokens=5
        )
        (out * coef).sum().backward()
        what = f"temperature {'per token' if isinstance(temperature, torch.Tensor) else temperature}"
        assert_matches(
            (out.detach(), h.grad, w.grad), reference(h, w, x["labels"], temperature, with_entropy, coef), what
        )
        assert w.grad[TRUE_V:].abs().max() == 0, "vocabulary padding rows got a gradient"


def test_no_tensor_spans_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor made in forward and backward is at most one [rows x tile] block wide, apart from the
    [*, hidden] ones (hidden states, weight and their gradients): no [chunk x vocab] logits exist."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(logprobs, "_BLOCK_VALUES", 5 * 64)
    widest = []

    class Widths(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] != H:
                    widest.append((t.shape[1], str(func)))
            return out

    x = inputs()
    h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    with Widths():
        out = logprobs.vocab_parallel_logprobs(
            h, w, x["labels"], true_vocab=TRUE_V, temperature=x["temperature"], with_entropy=True, chunk_tokens=5
        )
        (out * x["coef_per_token"]).sum().backward()
    assert widest and max(widest)[0] <= 64, max(widest)


def test_bf16_weights_keep_fp32_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logprobs, "_BLOCK_VALUES", 5 * 64)
    x = inputs(1)
    h = x["hidden"].bfloat16().requires_grad_()
    w = x["weight"].bfloat16().requires_grad_()
    out = logprobs.vocab_parallel_logprobs(
        h, w, x["labels"], true_vocab=TRUE_V, temperature=x["temperature"], with_entropy=True, chunk_tokens=5
    )
    (out * x["coef_per_token"]).sum().backward()
    assert out.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    want = reference(h.float(), w.float(), x["labels"], x["temperature"], True, x["coef_per_token"])
    for name, a, b in zip(("output", "hidden grad", "weight grad"), (out.detach(), h.grad, w.grad), want):
        rel = ((a.double() - b).norm() / b.norm()).item()  # bf16 logits and gradients: ~3 significant digits
        assert rel < 1e-2, f"bf16 {name}: relative error {rel:.2e}"


def test_tp2_matches_full_logits(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    x = inputs()
    save_file(x, tmp_path / "in.safetensors")
    code = run_ranks(
        [
            sys.executable,
            str(WORKER),
            "--inputs",
            str(tmp_path / "in.safetensors"),
            "--out",
            str(tmp_path / "out.safetensors"),
            "--tile",
            "64",
        ],
        2,
        timeout=600,
    )
    assert code == 0, f"TP2 worker exited with {code}"
    got = load_file(tmp_path / "out.safetensors")
    for case, temperature, with_entropy in (("float", 0.7, False), ("per_token", x["temperature"], True)):
        want = reference(x["hidden"], x["weight"], x["labels"], temperature, with_entropy, x["coef_" + case])
        assert_matches(
            tuple(got[f"{case}_{k}"] for k in ("out", "grad_hidden", "grad_weight")), want, f"TP2, temperature {case}"
        )
        assert got[f"{case}_grad_weight"][TRUE_V:].abs().max() == 0


def test_bad_temperature_is_named() -> None:
    h, w, y = torch.zeros(3, 4), torch.zeros(8, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"one value or one per token \(\[3\]\), got shape \[2\]"):
        logprobs.vocab_parallel_logprobs(h, w, y, true_vocab=8, temperature=torch.ones(2))
    with pytest.raises(ValueError, match="temperature: expected > 0"):
        logprobs.vocab_parallel_logprobs(h, w, y, true_vocab=8, temperature=0.0)
