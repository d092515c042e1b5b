"""Hang forensics (trainer/health.py), by injecting the hangs into real multi-process runs: a SIGSTOPped rank of
a training run, a rank busy outside the collectives, a rank stuck in C code holding the GIL (gloo ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from uniapl_megatron.trainer.health import HANG_EXIT_CODE

WORKER = Path(__file__).resolve().parent / "workers" / "hang.py"
LAUNCH = (
    "import sys; from uniapl_megatron.launch import run_ranks; "
    "sys.exit(run_ranks([sys.executable, *sys.argv[2:]], int(sys.argv[1])))"
)
TIMEOUT = 6.0


def _start(out: Path, world: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(world), str(WORKER), "--out", str(out), "--timeout", str(TIMEOUT), *args],
        start_new_session=True,
    )


def _beat(out: Path, rank: int) -> dict | None:
    try:
        return json.loads((out / "health" / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def _wait_for_step(out: Path, world: int, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not all((b := _beat(out, r)) and b["step"] >= step for r in range(world)):
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, t0: float, family: list[psutil.Process], timeout: float = TIMEOUT) -> float:
    try:
        proc.wait(timeout=timeout + 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.monotonic() - t0
    time.sleep(0.5)
    left = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {left}"
    return took


ROOT = Path(__file__).resolve().parents[1]
TRAIN_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from uniapl_megatron.demo import prepare

    return prepare(tmp_path_factory.mktemp("assets"), train_rows=200)


def _start_training(a: dict[str, str], out: Path, log_path: Path) -> subprocess.Popen:
    """`uniapl train` at TP2 on the tiny assets (many steps, hang_timeout_s = TRAIN_TIMEOUT), logging to `log_path`."""
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uniapl_megatron.cli",
                "train",
                str(ROOT / "examples" / "tiny_cpu.yaml"),
                f"model.hf_path={a['student']}",
                f"discriminator.path={a['discriminator']}",
                f"data.demo_paths=[{a['data']}]",
                f"data.prompt_paths=[{a['data']}]",
                "data.eval_prompt_paths=[]",
                "data.prompts_per_step=2",
                "data.demos_per_step=2",
                "sampling.group_size=2",
                "sampling.max_new_tokens=6",
                "rollout.engine=torch",
                "parallel.tensor_model_parallel_size=2",
                "train.steps=1000",
                "train.save_every=1000",
                f"train.hang_timeout_s={TRAIN_TIMEOUT}",
                f"train.output_dir={out}",
                "train.tensorboard=false",
                "train.plot=false",
            ],
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc


def _wait_for_metrics_rows(proc: subprocess.Popen, out: Path, log_path: Path, rows: int) -> None:
    """Until metrics.jsonl has `rows` rows; fails with the log's tail if the run ends first or 900 s pass."""
    deadline = time.monotonic() + 900
    while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= rows):
        assert proc.poll() is None, (
            f"the run ended early ({proc.returncode}): {log_path}:\n" + log_path.read_text()[-3000:]
        )
        assert time.monotonic() < deadline, "no training step within 900 s"
        time.sleep(0.2)


def test_sigstop_one_rank_of_a_training_run(assets, tmp_path):
    """`uniapl train` at TP2 (2 ranks; torch-engine rollouts, IFEval reward, online discriminator): rank 1 is
    SIGSTOPped mid-run. Rank 0 writes hang_report.json naming rank 1 and the phase it was in, and the run
    exits with 75 within hang_timeout_s + 60 s, leaving no process behind."""
    out = tmp_path / "run"
    proc = _start_training(assets, out, tmp_path / "log.txt")
    _wait_for_metrics_rows(proc, out, tmp_path / "log.txt", 2)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first.get("reward/timeouts") == 0.0, first  # the trainer's reward scores in the timed pool
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    pid = _beat(out, 1)["pid"]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        time.sleep(0.01)
    at_stop = _beat(out, 1)
    took = _finish(proc, t0, family, TRAIN_TIMEOUT)
    assert proc.returncode == HANG_EXIT_CODE and took <= TRAIN_TIMEOUT + 60, (proc.returncode, took)
    report = json.loads((out / "health" / "hang_report.json").read_text())
    assert [(m["rank"], m["phase"], m["step"]) for m in report["missing"]] == [(1, at_stop["phase"], at_stop["step"])]
    assert "stopped" in report["missing"][0]["why"] and report["reported_by"] == 0, report
    assert at_stop["phase"] in ("rollout", "score", "logprobs", "train", "sync")
    stack = (out / "health" / "stack_rank0.txt").read_text()
    assert "uniapl_megatron/trainer/loop.py" in stack and report["ranks"][0]["waiting_in"], (report, stack)
    print(
        f"rank 1 stopped in {at_stop['phase']} of step {at_stop['step']}; exit {proc.returncode} after "
        f"{took:.1f} s (hang_timeout_s {TRAIN_TIMEOUT:.0f}); rank 0 waited in {report['ranks'][0]['waiting_in']}"
    )


@pytest.mark.parametrize("how", ["sleep", "regex"])
def test_a_rank_stuck_outside_the_collectives_is_named(tmp_path, how):
    out = tmp_path / "run"
    proc = _start(out, 2, "--stuck", f"1:2:{how}")
    _wait_for_step(out, 2, 1, proc)
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    took = _finish(proc, time.monotonic(), family)
    assert proc.returncode == HANG_EXIT_CODE and took <= TIMEOUT + 60
    report = json.loads((out / "health" / "hang_report.json").read_text())
    assert [(m["rank"], m["phase"], m["step"]) for m in report["missing"]] == [(1, "score", 2)], report
    why = report["missing"][0]["why"]
    # Python busy outside a collective: its watchdog still beats. C code holding the GIL: it goes silent, and
    # faulthandler's C-level timer dumps its stack anyway.
    assert ("busy outside any collective" in why) if how == "sleep" else ("holds the GIL" in why), why
    stack = (out / "health" / "stack_rank1.txt").read_text()
    call = "time.sleep(10**6)" if how == "sleep" else "re.match("
    line = next(i for i, text in enumerate(WORKER.read_text().splitlines(), 1) if call in text)
    assert f'hang.py", line {line} in main' in stack, stack  # where it is stuck


def test_no_hang_no_report(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, 2, "--steps", "5")
    assert proc.wait(timeout=120) == 0
    assert not (out / "health" / "hang_report.json").exists()
    assert _beat(out, 1)["step"] == 4
