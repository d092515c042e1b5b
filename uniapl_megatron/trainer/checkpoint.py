"""Trainer checkpoints: model + optimizer (Megatron distributed checkpoint), scheduler, data position,
RNG, discriminator, counters. Written aside and renamed; the ``latest`` pointer moves last; keep the last K.

Layout of ``<output_dir>/checkpoints/step_000042/``::

    uniapl_checkpoint.json  + hf/   same as tools/convert_hf.py import writes, so `export` works on it
    model/                          torch_dist: model and (dp-reshardable) optimizer state
    trainer_state.json              step, scheduler, sampler, counters
    rng/rank_00000.json             Python / numpy / torch RNG of each rank
    discriminator.pt                online discriminator state (tensors only; loaded weights_only)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..convert.checkpoint import FORMAT, HF_SIDE_FILES, META_NAME, model_sharded_state_dict

LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = Path(output_dir) / "checkpoints"
    pointer = ckpts / LATEST
    if not pointer.is_file():
        return None
    path = ckpts / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": repr(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist()}


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _sharded(student: Any, is_loading: bool) -> dict[str, Any]:
    from ..convert.params import unwrap

    model_sd = model_sharded_state_dict([unwrap(c) for c in student.chunks])
    opt_sd = student.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, sharding_type="dp_reshardable") \
        if student.parallel.use_distributed_optimizer else student.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return {"model": model_sd, "optimizer": opt_sd}


def save_checkpoint(output_dir: str | Path, step: int, student: Any, state: dict[str, Any], meta: dict[str, Any],
                    hf_dir: str | None, discriminator: Any = None, keep_last: int = 2) -> Path:
    """Collective. ``state`` is JSON-able trainer state (scheduler, sampler, counters)."""
    from megatron.core import dist_checkpointing

    ckpts = Path(output_dir) / "checkpoints"
    name = f"step_{step:06d}"
    final, tmp = ckpts / name, ckpts / f".{name}.partial"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    dist_checkpointing.save(_sharded(student, is_loading=False), str(tmp / "model"))
    _write_json(tmp / "rng" / f"rank_{_rank():05d}.json", _rng_state())
    if _rank() == 0:
        if discriminator is not None and hasattr(discriminator, "state_dict"):
            torch.save(discriminator.state_dict(), tmp / "discriminator.pt")
        (tmp / "hf").mkdir()
        for f in HF_SIDE_FILES:
            if hf_dir and (Path(hf_dir) / f).is_file():
                shutil.copy2(Path(hf_dir) / f, tmp / "hf" / f)
        _write_json(tmp / META_NAME, {"format": FORMAT, **meta})
        _write_json(tmp / "trainer_state.json", {"step": step, **state})
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = ckpts / (LATEST + ".tmp")
        pointer.write_text(name + "\n")
        os.replace(pointer, ckpts / LATEST)  # the pointer moves only once the checkpoint is whole
        done = sorted(p for p in ckpts.glob("step_*") if p.is_dir())
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, student: Any, discriminator: Any = None) -> dict[str, Any]:
    """Restore model, optimizer, RNG, discriminator; returns the trainer state."""
    from megatron.core import dist_checkpointing

    from ..convert.params import unwrap

    with torch.no_grad():
        # The optimizer's state must exist before its sharded state dict can describe what to load.
        for opt in getattr(student.optimizer, "chained_optimizers", [student.optimizer]):
            if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
                opt._init_optimizer_states_with_dummy_values()
        sharded = _sharded(student, is_loading=True)
        loaded = dist_checkpointing.load(sharded, str(path / "model"))
        chunks = [unwrap(c) for c in student.chunks]
        if len(chunks) == 1:
            chunks[0].load_state_dict(loaded["model"], strict=False)
        else:
            for i, c in enumerate(chunks):
                c.load_state_dict(loaded["model"][f"model{i}"], strict=False)
        student.optimizer.load_state_dict(loaded["optimizer"])
    rng = path / "rng" / f"rank_{_rank():05d}.json"
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    if discriminator is not None and hasattr(discriminator, "load_state_dict") and (path / "discriminator.pt").is_file():
        discriminator.load_state_dict(torch.load(path / "discriminator.pt", weights_only=True, map_location="cpu"))
    return json.loads((path / "trainer_state.json").read_text())


def restore_adam_step(optimizer: Any, num_updates: int) -> None:
    """Adam's per-parameter step count (its bias correction) after a load: Megatron's sharded optimizer
    state does not carry it through torch's AdamW fallback, so it is set from the scheduler's count."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if "step" in state:
                step = state["step"]
                state["step"] = torch.full_like(step, float(num_updates)) if torch.is_tensor(step) else num_updates
