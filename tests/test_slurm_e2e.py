"""The 1-node Slurm script on a real (local, one-node) Slurm cluster, with the real trainer.

Needs the cluster of `.ci/slurm_up.sh` (`eval "$(.ci/slurm_up.sh)"` first), `examples/tiny_cpu.yaml`
and the trainer CLI (`uniapl_megatron.cli`); fails, with the reason, when any is missing (`make test` and
`.ci/run` provide all of them, so a missing one is a broken set-up, never a reason to skip).
1. sbatch slurm/uniapl_1node.sh with the tiny CPU config (a few steps); the time-limit path: SIGUSR1 to
   the batch shell (what `--signal=B:USR1@N` sends) mid-run; the trainer saves and exits, the job requeues
   itself and the next run resumes and completes, leaving <train.output_dir>/checkpoints/latest naming a
   step_XXXXXX folder.
2. Then scontrol requeue (+ StartTime=now) of the completed job; the third run completes, the launcher saw
   the checkpoint, the trainer says it resumed from it, and the earlier runs' checkpoints were not rewritten.
3. A hang report or the trainer's stop before the job's end time requeues the job; a finished run does
   not (a stand-in trainer leaves the files the real one does).
Knobs: UNIAPL_E2E_CONFIG (another config), UNIAPL_E2E_OVERRIDES (extra section.key=value,
shell-split, after the test's own; with the default config the test's own make the steps small and turn the
held-out evaluation off), UNIAPL_E2E_TIMEOUT (seconds per run, default 900),
UNIAPL_PYTHON (the interpreter the jobs use; default this one).
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "uniapl_1node.sh"
CONFIG = Path(os.environ.get("UNIAPL_E2E_CONFIG", ROOT / "examples" / "tiny_cpu.yaml"))
TIMEOUT = float(os.environ.get("UNIAPL_E2E_TIMEOUT", "900"))
# With the default config: small steps and no held-out evaluation (what is tested is the job's launch, stop,
# requeue and resume; the training inside it is the tiny default's, at a size that keeps the runs short).
SMALL = (
    [
        "data.prompts_per_step=2",
        "data.demos_per_step=2",
        "sampling.group_size=2",
        "sampling.max_new_tokens=6",
        "data.eval_prompt_paths=[]",
        "train.tensorboard=false",
        "train.plot=false",
    ]
    if CONFIG == ROOT / "examples" / "tiny_cpu.yaml"
    else []
)
DONE = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _cluster_env() -> dict[str, str] | None:
    """The environment for Slurm commands, or None when no local cluster answers."""
    env = dict(os.environ)
    env.setdefault("SLURM_CONF", "/tmp/uniapl-slurm/slurm.conf")
    env["HF_HUB_OFFLINE"] = "1"
    if not shutil.which("sbatch") or not Path(env["SLURM_CONF"]).is_file():
        return None
    try:
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return env if "is UP" in ping.stdout else None


def _missing() -> str | None:
    if _cluster_env() is None:
        return 'no local Slurm cluster answers: run `eval "$(.ci/slurm_up.sh)"` first'
    if not CONFIG.is_file():
        return f"{CONFIG} does not exist yet (the tiny CPU config comes with the trainer)"
    if importlib.util.find_spec("uniapl_megatron.cli") is None:
        return "the trainer CLI (uniapl_megatron.cli) does not exist yet"
    return None


@pytest.fixture
def cluster():
    reason = _missing()
    if reason:
        pytest.fail(reason)
    env = _cluster_env()
    env.setdefault("UNIAPL_PYTHON", sys.executable)
    jobs: list[str] = []
    yield env, jobs
    for job in jobs:  # never leave a job behind, whatever happened
        subprocess.run(["scancel", job], env=env, capture_output=True)


def _tasks_needed() -> int:
    """One data-parallel replica of the config's layout: tp x pp x cp ranks."""
    par = (yaml.safe_load(CONFIG.read_text()) or {}).get("parallel") or {}
    n = 1
    for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        n *= int(par.get(k) or 1)
    if n > (os.cpu_count() or 1):
        pytest.fail(f"{CONFIG} needs {n} ranks, this node has {os.cpu_count()} CPUs: pick a smaller UNIAPL_E2E_CONFIG")
    return n


def _prepare_assets(env: dict) -> None:
    """The tiny config's student, discriminator and data (what `uniapl demo` builds, offline)."""
    if CONFIG != ROOT / "examples" / "tiny_cpu.yaml" or (ROOT / "runs/demo_assets/synthetic_eval.jsonl").is_file():
        return
    r = subprocess.run(
        [env["UNIAPL_PYTHON"], "-m", "uniapl_megatron.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, f"building the demo assets failed:\n{r.stderr[-3000:]}"


def _submit(env: dict, jobs: list, out: Path, log_dir: Path, extra: list[str]) -> str:
    _prepare_assets(env)
    overrides = [f"train.output_dir={out}", *SMALL, *extra, *shlex.split(os.environ.get("UNIAPL_E2E_OVERRIDES", ""))]
    cmd = [
        "sbatch",
        "--parsable",
        f"--chdir={ROOT}",
        f"--output={log_dir}/job-%j.out",
        # The header asks for 8 GPUs x 8 tasks; this CPU node has no GPUs and few cores.
        "--gpus-per-node=0",
        f"--ntasks-per-node={_tasks_needed()}",
        f"--cpus-per-task={max(1, (os.cpu_count() or 1) // _tasks_needed())}",
        f"--time={int(TIMEOUT // 60) + 5}",
        str(SCRIPT),
        str(CONFIG),
        *overrides,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    job = r.stdout.strip().split(";")[0]
    jobs.append(job)
    return job


def _job(env: dict, job: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"scontrol show job {job}: {r.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def _wait(env: dict, job: str, log: Path, restarts: int, start_now: bool = False) -> dict:
    """Poll until the job's run number `restarts` has ended; return its fields."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        info = _job(env, job)
        if start_now and info["JobState"] == "PENDING" and int(info["Restarts"]) == restarts:
            # A requeued job waits ~120 s (BeginTime) before it may start again. Not within the
            # second its last run ended, though: slurmd would refuse the launch ("credential
            # revoked") and the job would fail.
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
            start_now = False
        if info["JobState"] in DONE and int(info["Restarts"]) == restarts:
            return info
        time.sleep(1)
    pytest.fail(f"job {job} run {restarts} did not end within {TIMEOUT:.0f} s; log:\n{_text(log)}")


def _text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no log)"


def _checkpoints(out: Path) -> tuple[str, dict[str, int]]:
    """(what `latest` names, {step folder: inode})."""
    ck = out / "checkpoints"
    latest = ck / "latest"
    assert latest.is_file(), f"no {latest}; found {sorted(p.name for p in ck.iterdir()) if ck.is_dir() else 'nothing'}"
    name = latest.read_text().strip()
    assert re.fullmatch(r"step_\d+", Path(name).name), f"{latest} names {name!r}, not step_XXXXXX"
    assert (ck / Path(name).name).is_dir(), f"{latest} names {name}, which does not exist"
    steps = {p.name: p.stat().st_ino for p in ck.iterdir() if re.fullmatch(r"step_\d+", p.name)}
    return Path(name).name, steps


def _run_section(text: str, restart: int) -> str:
    """The part of the (appended) job log written by run number `restart`."""
    marks = [m.start() for m in re.finditer(r"\[uniapl-launch\] job \d+ restart \d+:", text)]
    starts = [m for m in marks if f" restart {restart}:" in text[m : m + 80]]
    assert starts, f"no launcher banner for restart {restart} in the log:\n{text}"
    nxt = [m for m in marks if m > starts[0]]
    return text[starts[0] : nxt[0] if nxt else len(text)]


def _assert_resumed(section: str, ckpt: str) -> None:
    """The launcher saw the checkpoint and the trainer (not the launcher) said it resumed from it."""
    assert f"latest checkpoint: {ckpt}" in section, f"launcher did not see {ckpt}:\n{section}"
    step = int(ckpt.split("_")[1])
    trainer_lines = [ln for ln in section.splitlines() if "[uniapl-launch]" not in ln]
    said = [
        ln for ln in trainer_lines if re.search(r"resum", ln, re.I) and (ckpt in ln or re.search(rf"\b{step}\b", ln))
    ]
    assert said, f"the trainer never said it resumed from {ckpt} (step {step}):\n{section}"


def test_time_limit_signal_saves_requeues_and_resumes(cluster, tmp_path):
    """1 and 2 on one job (three runs, so three trainer start-ups rather than four): run 0 gets the time-limit
    signal, saves and requeues itself; run 1 resumes and completes; `scontrol requeue` starts run 2, which
    resumes from run 1's last checkpoint."""
    env, jobs = cluster
    out, log_dir = tmp_path / "run", tmp_path
    job = _submit(env, jobs, out, log_dir, ["train.steps=12", "train.save_every=2"])
    log = log_dir / f"job-{job}.out"
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + TIMEOUT
    while not latest.exists():  # signal once the trainer is stepping (its handler is installed)
        info = _job(env, job)
        if info["JobState"] in DONE:
            pytest.fail(
                f"job {job} ended ({info['JobState']}, exit {info.get('ExitCode')}) before its first "
                f"checkpoint (a config whose save interval is not shorter than the run, set with "
                f"UNIAPL_E2E_OVERRIDES, ends this way too); log:\n{_text(log)}"
            )
        assert time.monotonic() < deadline, f"no checkpoint within {TIMEOUT:.0f} s:\n{_text(log)}"
        time.sleep(0.5)
    before, _ = _checkpoints(out)
    # What `#SBATCH --signal=B:USR1@N` does near the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, capture_output=True)
    info = _wait(env, job, log, restarts=1, start_now=True)
    text = _text(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text)
    first = _run_section(text, 0)
    assert "got SIGUSR1" in first and "requeueing job" in first, first
    # The trainer handled the signal (exit 0, not killed by it) and saved a newer checkpoint.
    assert "train step ended with status 0" in first, first
    saved = re.search(r"requeueing job \d+ \(restart 1\); it resumes from the checkpoint: (step_\d+)", first)
    assert saved, f"the launcher did not report the checkpoint it requeued with:\n{first}"
    assert int(saved.group(1).split("_")[1]) > int(before.split("_")[1]), (before, first)
    _assert_resumed(_run_section(text, 1), saved.group(1))

    # The job has run to completion and left `latest`; `scontrol requeue` starts it again: the next run
    # resumes from that checkpoint and rewrites none of the step folders (a fresh start would).
    ckpt, steps_before = _checkpoints(out)
    time.sleep(2)  # see _wait: a relaunch within the second of the end is refused by slurmd
    subprocess.run(["scontrol", "requeue", job], env=env, check=True, capture_output=True)
    info = _wait(env, job, log, restarts=2, start_now=True)
    text = _text(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text)
    _assert_resumed(_run_section(text, 2), ckpt)
    ckpt_after, steps_after = _checkpoints(out)
    assert int(ckpt_after.split("_")[1]) >= int(ckpt.split("_")[1])
    for name, inode in steps_before.items():
        if name in steps_after:
            assert steps_after[name] == inode, f"{name} was rewritten by the resumed run"


# A stand-in for the trainer (for `-m uniapl_megatron.cli train` only; anything else runs on the real
# interpreter): it leaves what the real trainer leaves when it stops for one of these reasons, then exits
# with the trainer's status for it. tests/test_health.py and tests/test_checkpoint_scale.py show the real
# trainer writing these files; here the launcher's requeue decision runs on a real Slurm.
_STAND_IN = """#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = uniapl_megatron.cli ] && [ "$3" = train ]; then
    for a in "$@"; do case "$a" in train.output_dir=*) out="${a#train.output_dir=}" ;; esac; done
    mkdir -p "$out/health"
    # The trainer's save-by deadline reads the job's end time from squeue inside the job.
    "$UNIAPL_REAL_PYTHON" -c "from uniapl_megatron.trainer.checkpoint import job_end_time as e; print(e('auto'))" \
        > "$out/end_time.txt"
    case "$UNIAPL_TEST_STOP" in
        hang) echo '{"missing": [{"rank": 1, "phase": "train", "step": 3}]}' > "$out/health/hang_report.json"
              exit 75 ;;
        deadline) echo '{"reason": "deadline", "step": 3}' > "$out/health/exit.json"; exit 0 ;;
        *) echo '{"reason": "finished", "step": 4}' > "$out/health/exit.json"; exit 0 ;;
    esac
fi
exec "$UNIAPL_REAL_PYTHON" "$@"
"""


@pytest.mark.parametrize("stop, requeued", [("hang", True), ("deadline", True), ("finished", False)])
def test_hang_and_deadline_stops_requeue(cluster, tmp_path, stop, requeued):
    env, jobs = cluster
    fake = tmp_path / "python"
    fake.write_text(_STAND_IN)
    fake.chmod(0o755)
    env = dict(env, UNIAPL_REAL_PYTHON=env["UNIAPL_PYTHON"], UNIAPL_PYTHON=str(fake), UNIAPL_TEST_STOP=stop)
    out = tmp_path / "run"
    out.mkdir()
    if stop == "hang":  # an earlier run's report does not count
        (out / "health").mkdir()
        (out / "health" / "exit.json").write_text('{"reason": "deadline", "step": 1}')
        os.utime(out / "health" / "exit.json", (time.time() - 3600, time.time() - 3600))
    job = _submit(env, jobs, out, tmp_path, [])
    log = tmp_path / f"job-{job}.out"
    deadline = time.monotonic() + 300
    ends = set()
    while True:
        info = _job(env, job)
        if int(info["Restarts"]) >= 1 or info["JobState"] in DONE:
            break
        if info["JobState"] == "RUNNING":
            ends.add(datetime.datetime.fromisoformat(info["EndTime"]).timestamp())
        assert time.monotonic() < deadline, _text(log)
        time.sleep(0.2)
    time.sleep(1)
    text = _text(log)
    assert float((out / "end_time.txt").read_text()) in ends, ends  # what Slurm says while the job runs
    if requeued:
        assert int(_job(env, job)["Restarts"]) == 1, text
        why = {"hang": "the trainer hung", "deadline": "saved and stopped before the job's end time"}[stop]
        assert re.search(rf"{why}.*requeueing job {job} \(restart 1\)", text), text
    else:
        assert info["JobState"] == "COMPLETED" and "requeueing" not in text, (info, text)
