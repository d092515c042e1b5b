"""Distribution analyses of student vs teacher answers: summaries, two-sample distances, plots.

Used for the paper's response-length and log-probability comparisons. The two distances are
the two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs, in [0, 1])
and the 1-Wasserstein distance (area between the empirical CDFs, in the data's own unit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _array(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name}: no values")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a


def summary(x: Sequence[float], name: str = "values") -> dict[str, float]:
    """n, mean, std, min, max and the QUANTILES (keys p10, p25, p50, p75, p90)."""
    a = _array(x, name)
    out = {
        "n": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
    }
    for q in QUANTILES:
        out[f"p{int(round(q * 100))}"] = float(np.quantile(a, q))
    return out


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """sup_x |F_a(x) - F_b(x)| over the pooled sample points."""
    x, y = np.sort(_array(a, "a")), np.sort(_array(b, "b"))
    grid = np.concatenate([x, y])
    fa = np.searchsorted(x, grid, side="right") / x.size
    fb = np.searchsorted(y, grid, side="right") / y.size
    return float(np.max(np.abs(fa - fb)))


def wasserstein_1(a: Sequence[float], b: Sequence[float]) -> float:
    """Integral of |F_a - F_b| (earth mover's distance between the empirical distributions)."""
    x, y = np.sort(_array(a, "a")), np.sort(_array(b, "b"))
    grid = np.sort(np.concatenate([x, y]))
    widths = np.diff(grid)
    fa = np.searchsorted(x, grid[:-1], side="right") / x.size
    fb = np.searchsorted(y, grid[:-1], side="right") / y.size
    return float(np.sum(np.abs(fa - fb) * widths))


def compare(student: Sequence[float], teacher: Sequence[float]) -> dict[str, Any]:
    """Both summaries and the distances between them."""
    s, t = summary(student, "student"), summary(teacher, "teacher")
    return {
        "student": s,
        "teacher": t,
        "mean_diff": s["mean"] - t["mean"],
        "ks": ks_statistic(student, teacher),
        "wasserstein": wasserstein_1(student, teacher),
    }


def plot_comparison(
    series: Mapping[str, Sequence[float]], title: str, xlabel: str, path: str | Path, bins: int = 40
) -> Path:
    """Overlaid histograms (left) and empirical CDFs (right) of each named series, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from uniapl_megatron.eval.io import atomic_savefig

    arrays = {k: _array(v, k) for k, v in series.items()}
    lo = min(float(a.min()) for a in arrays.values())
    hi = max(float(a.max()) for a in arrays.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
    try:
        for name, a in arrays.items():
            ax_h.hist(a, bins=edges, alpha=0.5, density=True, label=f"{name} (n={a.size}, mean={a.mean():.3g})")
            xs = np.sort(a)
            ax_c.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=name)
        ax_h.set_xlabel(xlabel)
        ax_h.set_ylabel("density")
        ax_h.legend(fontsize=8)
        ax_c.set_xlabel(xlabel)
        ax_c.set_ylabel("cumulative share")
        ax_c.legend(fontsize=8)
        fig.suptitle(title)
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)
