"""Run logging on rank 0: one progress bar on the console, the run's log file, metrics.jsonl, TensorBoard,
optional wandb, and the final plot.

The console shows the progress bar with the step's figures and little else. Everything libraries log goes to
``<output_dir>/run.log``: vLLM's loggers (its per-step INFO lines and the repeated, harmless "RotaryEmbedding:
Failed to load weights" warning, also from its child processes), Python warnings, and records of other
libraries. This project's own warnings are shown on the console as well.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..eval.io import atomic_write_json

_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(filename)s:%(lineno)d] %(message)s"
# Figures shown next to the bar: metric -> short name.
log = logging.getLogger(__name__)
_BAR_FIGURES = {"reward/mean": "reward", "eval/heldout_reward": "heldout", "loss/total": "loss"}


class _ConsoleHandler(logging.Handler):
    """Writes above the progress bar instead of through it: warnings to stderr; the trainer's own milestones
    (INFO: resumed, stage switch, saved on a signal) to stdout."""

    def __init__(self, level: int, stream: Any = None, below: int | None = None) -> None:
        super().__init__(level)
        self.stream, self.below = stream, below

    def filter(self, record: logging.LogRecord) -> bool:
        return (self.below is None or record.levelno < self.below) and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class LogRouting:
    """Sends library logging of this process to ``log_file`` until ``close()``.

    vLLM configures its own loggers when an engine starts (from VLLM_LOGGING_CONFIG_PATH, which it also hands
    to its child processes): a dictConfig file is written next to the log and named there, unless the user
    set one. A user's own logging set-up (handlers already on the root logger) is left alone.
    """

    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        self.file.setFormatter(logging.Formatter(_FORMAT))
        self.console = _ConsoleHandler(logging.WARNING)
        self.console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root, ours = logging.getLogger(), logging.getLogger("uniapl_megatron")
        self._root_level = root.level
        root.addHandler(self.file)
        root.setLevel(logging.INFO)
        ours.addHandler(self.console)
        self.milestones = _ConsoleHandler(logging.INFO, sys.stdout, below=logging.WARNING)
        self.milestones.setFormatter(logging.Formatter("%(message)s"))
        self._trainer = logging.getLogger("uniapl_megatron.trainer")
        self._trainer_level = self._trainer.level
        self._trainer.setLevel(logging.INFO)
        self._trainer.addHandler(self.milestones)
        logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> the root's file handler
        self._env_set = self._route_vllm()
        self._hf_progress = self._route_transformers()

    def _route_vllm(self) -> bool:
        config = {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"run": {"format": _FORMAT}},
            "handlers": {
                "run_log": {
                    "class": "logging.FileHandler",
                    "filename": str(self.log_file),
                    "encoding": "utf-8",
                    "formatter": "run",
                    "level": "INFO",
                }
            },
            "loggers": {"vllm": {"handlers": ["run_log"], "level": "INFO", "propagate": False}},
        }
        if "vllm" in sys.modules:  # already configured in this process (a second run, tests): redirect now
            vllm = logging.getLogger("vllm")
            for h in list(vllm.handlers):
                vllm.removeHandler(h)
            vllm.addHandler(self.file)
            vllm.propagate = False
        if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
            return False  # the user's own set-up (with configure off, vLLM's records reach the root's file handler)
        path = atomic_write_json(self.log_file.with_name("vllm_logging.json"), config)
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
        return True

    @staticmethod
    def _route_transformers() -> bool | None:
        """transformers' records to the log file; its progress bars (model loading) off, as they would break the
        console's one bar. Returns whether its bars were on, to restore them."""
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return None
        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        return was

    def close(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.file)
        root.setLevel(self._root_level)
        logging.getLogger("uniapl_megatron").removeHandler(self.console)
        self._trainer.removeHandler(self.milestones)
        self._trainer.setLevel(self._trainer_level)
        logging.captureWarnings(False)
        if self._env_set:
            os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None)
        if self._hf_progress is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_default_handler()
            hf_logging.disable_propagation()
            if self._hf_progress:
                hf_logging.enable_progress_bar()
        self.file.close()


class RunLogger:
    def __init__(self, out: Path, cfg: Any, enabled: bool) -> None:
        self.enabled, self.out, self.cfg = enabled, out, cfg
        self.history: list[dict[str, float]] = []
        self.tb = self.wandb = self.bar = self.routing = None
        self.figures: dict[str, str] = {}
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.routing = LogRouting(out / "run.log")
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
                log.warning("train.wandb_project is set but wandb is not installed; logging without it")

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
        keep = [
            line
            for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= last_step
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)

    def _record(self, step: int, stats: dict[str, float]) -> dict[str, float]:
        """One metrics row, ``step`` = optimizer steps done (0: before the first)."""
        row = {"step": step, **{k: float(v) for k, v in stats.items()}}
        self.history.append(row)
        if not self.enabled:
            return row
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        self.figures.update({short: f"{row[k]:.3g}" for k, short in _BAR_FIGURES.items() if k in row})
        return row

    def _bar(self, initial: int) -> tqdm:
        if self.bar is None:
            self.bar = tqdm(total=self.cfg.train.steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            self.bar.write(f"run log (vLLM, warnings): {self.out / 'run.log'}", file=sys.stderr)
        return self.bar

    def evaluation(self, step: int, stats: dict[str, float]) -> None:
        """A row of held-out figures taken outside a training step (before the first one)."""
        if stats:
            self._record(step, stats)
            if self.enabled:
                self._bar(step).set_postfix(self.figures)

    def step(self, step: int, stats: dict[str, float]) -> None:
        self._record(step + 1, stats)
        if not self.enabled:
            return
        bar = self._bar(step)
        bar.set_postfix(self.figures, refresh=False)
        bar.update(1)

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
        summary: dict[str, Any] = {
            "reward_first": round(sum(rewards[:k]) / k, 4) if rewards else None,
            "reward_last": round(sum(rewards[-k:]) / k, 4) if rewards else None,
        }
        heldout = [h["eval/heldout_reward"] for h in self.history if "eval/heldout_reward" in h]
        if heldout:  # the first is taken before any training step
            summary.update(
                heldout_reward_first=round(heldout[0], 4),
                heldout_reward_last=round(heldout[-1], 4),
                heldout_gain=round(heldout[-1] - heldout[0], 4),
            )
        summary.update(
            {
                "steps": sum(1 for h in self.history if h["step"] > 0),
                "train_seconds": round(seconds, 1),
                "last_checkpoint_step": last_saved,
            }
        )
        if not self.enabled:
            return summary
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.cfg.train.plot and self.history:
            summary["plot"] = str(self.plot())
        summary["log"] = str(self.out / "run.log")
        atomic_write_json(self.out / "summary.json", summary)
        if self.routing is not None:
            self.routing.close()
        return summary

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        keys = [
            k for k in ("reward/mean", "eval/heldout_reward", "disc/score_mean") if any(k in h for h in self.history)
        ]
        losses = sorted({k for h in self.history for k in h if k.startswith("loss/")})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for k in keys:
            pts = [(h["step"], h[k]) for h in self.history if k in h]
            axes[0].plot(*zip(*pts), label=k, marker="o" if k.startswith("eval/") else None)
        axes[0].set_xlabel("step"), axes[0].set_title("reward"), axes[0].legend()
        for k in losses:
            axes[1].plot(steps, [h.get(k, float("nan")) for h in self.history], label=k)
        axes[1].set_xlabel("step"), axes[1].set_title("loss terms"), axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = self.out / "plot.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
