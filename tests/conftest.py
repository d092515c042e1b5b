"""Suite-wide guard: a test must not leave launcher variables changed in the pytest process. Later tests start
ranks with the inherited environment (uniapl_megatron.launch.run_ranks, torchrun, sbatch); a leaked
LOCAL_WORLD_SIZE once placed rank 1 of a TP2 run outside its node, a test and 40 minutes later."""

from __future__ import annotations

import os

import pytest

LAUNCHER_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "LD_PRELOAD",
)


@pytest.fixture(autouse=True, scope="module")
def launcher_env_unchanged(request: pytest.FixtureRequest):
    before = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    yield
    after = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    changed = {k: (before[k], after[k]) for k in LAUNCHER_ENV if before[k] != after[k]}
    for k, (old, _) in changed.items():  # put them back so one leak fails one module, not every later one
        if old is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = old
    assert not changed, f"{request.module.__name__} changed launcher variables (before, after): {changed}"
