"""The switch of a staged preset (objective.algorithm ``x->y``) inside one run.

The first stage runs `optim`'s learning rate and schedule over its own optimizer updates
[0, objective.stage_switch_step). At the switch the second stage starts like a fresh run from the first
stage's weights (as the paper's SFT -> RL pipelines do): a schedule of its own over the remaining updates
(the `stage2` section), fresh Adam moments, and, with stage2.reset_reference, a KL reference that is a copy
of the student at the switch. That reference is saved once, so a run resumed after the switch gets it back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .config import RunConfig, SecondStageConfig, updates_per_step
from .optim import lr_scheduler, reset_optimizer_state

log = logging.getLogger(__name__)
REFERENCE_DIR = "stage2_reference"  # under <output_dir>/checkpoints; never rotated away


class StageSwitch:
    """When the second stage starts (a step index) and what changes then."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.updates = updates_per_step(cfg)
        self.total_updates = cfg.train.steps * self.updates
        staged = "->" in cfg.objective.algorithm
        # check_run refuses a switch inside a step, so it falls on a step boundary.
        self.switch_step = cfg.objective.stage_switch_step // self.updates if staged else None
        self.second = cfg.stage2 or SecondStageConfig()
        self.reference_dir = Path(cfg.train.output_dir) / "checkpoints" / REFERENCE_DIR

    def first_schedule_updates(self) -> int:
        """Updates the initial LR schedule spans: the first stage's, or the whole run's."""
        return self.cfg.objective.stage_switch_step if self.switch_step is not None else self.total_updates

    def second_optim(self) -> Any:
        """`optim` with the second stage's learning rate and schedule."""
        s = self.second
        changes = {
            k: getattr(s, k) for k in ("lr", "min_lr", "warmup_steps", "decay_style") if getattr(s, k) is not None
        }
        return dataclasses.replace(self.cfg.optim, **changes)

    def maybe_switch(self, trainer: Any, step: int) -> bool:
        """At the first step of the second stage: new schedule, fresh optimizer state, new reference."""
        if step != self.switch_step:
            return False
        # The last step's checkpoint may still be written in the background (an async save): it must hold the
        # first stage's optimizer state, and the reference's save below is one of Megatron's own saves.
        trainer.ckpt.finalize()
        student = trainer.student
        student.scheduler = self._second_scheduler(student)
        reset_optimizer_state(student.optimizer)
        reset = trainer.ref is not None and self.second.reset_reference
        if reset:
            trainer.ref.copy_weights_from(student)
            self._save_reference(trainer.ref)
        if dist.get_rank() == 0:
            log.info(
                "stage switch at optimizer update %d (step %d): lr %g (%s), fresh Adam moments%s",
                self.cfg.objective.stage_switch_step,
                step,
                self.second_optim().lr,
                self.second_optim().decay_style,
                ", KL reference = the current student" if reset else "",
            )
        return True

    def resume(self, trainer: Any, done_steps: int) -> None:
        """Before the checkpoint's scheduler state is loaded: a run resumed inside the second stage gets the
        second stage's schedule (whose state the checkpoint holds) and the reference saved at the switch."""
        if self.switch_step is None or done_steps <= self.switch_step:
            return
        trainer.student.scheduler = self._second_scheduler(trainer.student)
        if trainer.ref is not None and self.second.reset_reference:
            from ..convert.checkpoint import load_model
            from ..convert.params import unwrap

            if not self.reference_dir.is_dir():  # renamed into place only once whole
                raise FileNotFoundError(
                    f"{self.reference_dir}: the KL reference saved at the stage switch is missing, so the resumed "
                    "second stage cannot use it (stage2.reset_reference)"
                )
            load_model([unwrap(c) for c in trainer.ref.chunks], self.reference_dir)

    def _second_scheduler(self, student: Any) -> Any:
        o = self.second_optim()
        # Megatron's schedule reads each parameter group's own max_lr / min_lr (set from `optim` when the
        # optimizer was built) before its constructor arguments.
        for group in student.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = o.lr, o.min_lr
        return lr_scheduler(student.optimizer, o, self.total_updates - self.cfg.objective.stage_switch_step)

    def _save_reference(self, ref: Any) -> None:
        """Collective: the reference's shards, written aside and renamed."""
        from ..convert.checkpoint import save_model
        from ..convert.params import unwrap

        tmp = self.reference_dir.with_name(f".{REFERENCE_DIR}.partial")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        save_model([unwrap(c) for c in ref.chunks], tmp)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(self.reference_dir, ignore_errors=True)
            os.replace(tmp, self.reference_dir)
        dist.barrier()
