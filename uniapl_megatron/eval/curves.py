"""Learning curves per preset from result records that carry them (``Result.curve``, written by ``uniapl sweep``).

For each (student, preset): the held-out reward (``eval/heldout_reward``, measured every ``train.eval_every``
steps) and the training reward (``reward/mean``, every step, for presets that roll out), each as the mean over
seeds with a band of one standard deviation. One PNG per preset, plus one with every preset's held-out mean.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .io import atomic_savefig

CURVES = {"eval/heldout_reward": "held-out reward", "reward/mean": "training reward"}


def slug(name: str) -> str:
    """A file-name-safe form: 'sft->a_grpo' -> 'sft-to-a_grpo'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("->", "-to-")).strip("_") or "x"


def _by_run(results: Sequence[Any]) -> dict[tuple[str, str], dict[Any, dict[str, list]]]:
    """(student, algorithm) -> {seed: curve}; a run's curve is the same in each of its benchmark records."""
    runs: dict[tuple[str, str], dict[Any, dict[str, list]]] = {}
    for r in results:
        if r.curve:
            runs.setdefault((r.student, r.algorithm), {}).setdefault(r.seed, r.curve)
    return runs


def mean_band(curves: Sequence[dict[str, list]], metric: str) -> tuple[list[float], list[float], list[float]]:
    """Steps every seed measured, the mean at each and the standard deviation (0 with one seed)."""
    series = [{float(s): float(v) for s, v in c.get(metric, []) if v is not None} for c in curves]
    series = [s for s in series if s]
    if not series:
        return [], [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    mean = [statistics.fmean(s[x] for s in series) for x in steps]
    sd = [statistics.stdev([s[x] for s in series]) if len(series) > 1 else 0.0 for x in steps]
    return steps, mean, sd


def plot_curves(results: Sequence[Any], out: Path) -> list[Path]:
    """curves/<student>/<preset>.png and curves/<student>/heldout_all.png; nothing when no record has a curve."""
    runs = _by_run(results)
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tables import ALGORITHM_LABELS

    written = []
    for student in sorted({s for s, _ in runs}):
        overview, ax_all = plt.subplots(figsize=(8, 5))
        for (st, algo), by_seed in runs.items():
            if st != student:
                continue
            label = ALGORITHM_LABELS.get(algo, algo)
            fig, ax = plt.subplots(figsize=(7, 4))
            for metric, name in CURVES.items():
                steps, mean, sd = mean_band(list(by_seed.values()), metric)
                if not steps:
                    continue
                style = {"marker": "o"} if metric.startswith("eval/") else {"alpha": 0.8, "linewidth": 1}
                seeds = f"{len(by_seed)} seed{'s' if len(by_seed) > 1 else ''}"
                ax.plot(steps, mean, label=f"{name} (mean of {seeds})", **style)
                ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)], alpha=0.2)
                if metric == "eval/heldout_reward":
                    ax_all.plot(steps, mean, marker="o", label=label)
            ax.set_xlabel("step"), ax.set_ylabel("reward"), ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{student}: {label}"), ax.legend(fontsize=8)
            written.append(atomic_savefig(fig, out / slug(student) / f"{slug(algo)}.png"))
            plt.close(fig)
        ax_all.set_xlabel("step"), ax_all.set_ylabel("held-out reward (mean over seeds)")
        ax_all.set_title(f"{student}: held-out reward per preset"), ax_all.legend(fontsize=8, ncol=2)
        written.append(atomic_savefig(overview, out / slug(student) / "heldout_all.png"))
        plt.close(overview)
    return written
