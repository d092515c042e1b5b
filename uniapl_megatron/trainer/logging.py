"""Run logging on rank 0: a progress bar, metrics.jsonl, TensorBoard, optional wandb, and the final plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    def __init__(self, out: Path, cfg: Any, enabled: bool) -> None:
        self.enabled, self.out, self.cfg = enabled, out, cfg
        self.history: list[dict[str, float]] = []
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        self.metrics_file = out / "metrics.jsonl"
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if cfg.train.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.train.wandb_project, config=cfg.to_dict(), dir=str(out))
            except ImportError:
                print("train.wandb_project is set but wandb is not installed; logging without it", flush=True)

    def restore(self, history: list[dict[str, float]]) -> None:
        self.history = list(history)
        if self.enabled:  # metrics.jsonl keeps only the steps that are part of the resumed run
            lines = [json.dumps(h) for h in self.history]
            tmp = self.metrics_file.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, self.metrics_file)
            self._truncate(self.out / "rollouts.jsonl", len(self.history))

    @staticmethod
    def _truncate(path: Path, last_step: int) -> None:
        """Keep the lines of steps <= last_step (a resumed run writes the later ones again)."""
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= last_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)

    def step(self, step: int, stats: dict[str, float]) -> None:
        row = {"step": step + 1, **{k: float(v) for k, v in stats.items()}}
        self.history.append(row)
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=self.cfg.train.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step + 1)
        if self.wandb is not None:
            self.wandb.log(row, step=step + 1)
        post = {k.split("/")[-1]: f"{row[k]:.3g}" for k in ("reward/mean", "loss/total") if k in row}
        self.bar.set_postfix(post)
        self.bar.update(1)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if self.enabled and rows:
            with (self.out / "samples.jsonl").open("a") as f:
                for r in rows:
                    f.write(json.dumps({"step": step + 1, **r}, ensure_ascii=False) + "\n")

    def rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Append one step's samples to rollouts.jsonl, the whole step in one write."""
        if self.enabled and rows:
            with (self.out / "rollouts.jsonl").open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))

    def finish(self, seconds: float, last_saved: int) -> dict[str, Any]:
        rewards = [h["reward/mean"] for h in self.history if "reward/mean" in h]
        k = max(1, min(5, len(rewards) // 4))
        summary = {
            "reward_first": round(sum(rewards[:k]) / k, 4) if rewards else None,
            "reward_last": round(sum(rewards[-k:]) / k, 4) if rewards else None,
            "steps": len(self.history),
            "train_seconds": round(seconds, 1),
            "last_checkpoint_step": last_saved,
        }
        if not self.enabled:
            return summary
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.cfg.train.plot and self.history:
            summary["plot"] = str(self.plot())
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        keys = [k for k in ("reward/mean", "disc/score_mean") if any(k in h for h in self.history)]
        losses = sorted({k for h in self.history for k in h if k.startswith("loss/")})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for k in keys:
            axes[0].plot(steps, [h.get(k, float("nan")) for h in self.history], label=k)
        axes[0].set_xlabel("step"), axes[0].set_title("reward"), axes[0].legend()
        for k in losses:
            axes[1].plot(steps, [h.get(k, float("nan")) for h in self.history], label=k)
        axes[1].set_xlabel("step"), axes[1].set_title("loss terms"), axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = self.out / "plot.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
