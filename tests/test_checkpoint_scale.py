"""Checkpoints at scale, by injecting the faults: fully reshardable optimizer state resumed at another TP / PP
layout matches an uninterrupted run there; SIGKILL at random moments of async saves never leaves a `latest`
that does not load or a partial checkpoint that is picked up; the save-by deadline from the job's end time."""

from __future__ import annotations

import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _models import tiny_qwen3
from _train_step import max_diff, train_step

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
LAUNCH = (
    "import sys; from uniapl_megatron.launch import run_ranks; "
    "sys.exit(run_ranks([sys.executable, *sys.argv[2:]], int(sys.argv[1])))"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("hf") / "m", tie=False, vocab=256)


TP2PP2 = (4, ["--tp", "2", "--pp", "2"])
TP1DP2 = (2, [])
# Adam whose eps is small enough that both moments shape the update (a lost exp_avg or exp_avg_sq moves the
# weights by ~lr), and large enough that gradients at rounding-noise level (which differ between layouts) do
# not become lr-sized sign steps.
ADAM = ["--adam", "--lr", "1e-3", "--adam-eps", "1e-4"]


def test_optimizer_state_resumes_on_another_layout(model, tmp_path):
    """Saved after step 1 at TP2 x PP2 and resumed at TP1 (DP2), and the reverse: the next 3 steps equal an
    uninterrupted 4-step run at the new layout. Adam's moments carry the first step into the next ones."""
    runs = {}
    for name, (world, args) in {"tp2pp2": TP2PP2, "tp1dp2": TP1DP2}.items():
        ck = tmp_path / f"ck_{name}"
        runs[name] = (ck, *train_step(model, tmp_path / name, world, *args, *ADAM, "--steps", "4", "--save", str(ck)))
    for saved, resumed in (("tp2pp2", "tp1dp2"), ("tp1dp2", "tp2pp2")):
        world, args = {"tp2pp2": TP2PP2, "tp1dp2": TP1DP2}[resumed]
        got, m = train_step(
            model,
            tmp_path / f"{saved}_to_{resumed}",
            world,
            *args,
            *ADAM,
            "--steps",
            "3",
            "--resume",
            str(runs[saved][0]),
        )
        _, ref, ref_m = runs[resumed]
        diff = max_diff(got, ref)
        assert diff <= 1e-5, f"{saved} -> {resumed}: weights after 3 resumed steps differ by {diff}"
        got_l, ref_l = ([s["loss/total"] for s in x["steps"]] for x in (m, ref_m))
        losses = [abs(a - b) for a, b in zip(got_l, ref_l[1:])]
        assert len(losses) == 3 and max(losses) <= 1e-5, (saved, resumed, got_l, ref_l)
        print(f"{saved} -> {resumed}: max |weight diff| {diff:.2e}, max |loss diff| {max(losses):.2e} over 3 steps")


def _events(out: Path) -> list[tuple[float, str, int]]:
    f = out / "events.txt"
    lines = f.read_text().splitlines() if f.is_file() else []
    return [(float(t), what, int(step)) for t, what, step in (line.split() for line in lines if line.count(" ") == 2)]


def _cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process and its descendants (what a killed run cost, whatever the load)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def _wait_for_a_save(proc: subprocess.Popen, out: Path, start: int, what: str, log_name: str) -> None:
    """Until a save of this run (events after `start`) has completed; fails if the worker exits or 600 s pass."""
    deadline = time.monotonic() + 600
    while sum(e[1] == "finalized" for e in _events(out)[start:]) < 1:
        assert proc.poll() is None, f"{what}: the worker exited with {proc.returncode}: see {log_name}"
        assert time.monotonic() < deadline, "no save completed within 600 s"
        time.sleep(0.05)


def _where_the_kill_landed(out: Path) -> tuple[int, str, str, list[str]]:
    """After a kill: `latest` must name a complete folder. (last save started, where it was, latest, partials)."""
    from uniapl_megatron.trainer.checkpoint import latest_checkpoint

    ev = _events(out)
    last_save = max(s for _, w, s in ev if w == "save")
    path = latest_checkpoint(out)
    assert path is not None and not path.name.startswith("."), path
    assert (path / "trainer_state.json").is_file() and (path / "model" / "metadata.json").is_file()
    partial = sorted(p.name for p in (out / "checkpoints").glob(".step_*"))
    where = {"save": "blocking part (or finalizing the one before)", "writing": "background write"}.get(
        ev[-1][1], ev[-1][1]
    )
    return last_save, where, path.name, partial


# Each kill costs a start of 2 ranks (most of its ~10 s). Ten: the check below needs at least 3 random moments
# inside a save, and with fewer kills a run short of them becomes likely enough to fail CI by chance.
KILLS = 10


def test_sigkill_during_async_saves_never_leaves_a_bad_latest(model, tmp_path):
    """10 times: 2 ranks train and save asynchronously after every step; the whole process group is SIGKILLed
    at a random moment; `latest` must name a complete folder, and the next run must load exactly the state
    that step held (weights and optimizer digests per rank, written before that save began)."""
    from uniapl_megatron.trainer.checkpoint import latest_checkpoint

    out = tmp_path / "run"
    out.mkdir()
    rng = random.Random(18)
    cmd = [
        sys.executable,
        "-c",
        LAUNCH,
        "2",
        str(WORKERS / "ckpt_kill.py"),
        "--hf",
        str(model),
        "--out",
        str(out),
        "--steps",
        "100000",
    ]
    log = open(tmp_path / "log.txt", "ab")  # noqa: SIM115
    landed, cpu = [], 0.0
    for trial in range(KILLS):
        before = latest_checkpoint(out)
        start = len(_events(out))
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        _wait_for_a_save(proc, out, start, f"trial {trial}", log.name)
        mine = _events(out)[start:]
        if before is not None:
            assert ("resumed", int(before.name.split("_")[1])) in [(w, s) for _, w, s in mine], mine
        saves = [t for t, w, _ in mine if w == "save"]
        period = max(saves[-1] - saves[-2], 0.2) if len(saves) > 1 else 1.0
        time.sleep(rng.uniform(0, 2 * period))
        cpu += _cpu_seconds(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        landed.append(_where_the_kill_landed(out))
    done = subprocess.run(
        [*cmd[:-2], "--steps", "0", "--verify-only"],
        stdout=log,
        stderr=log,
        timeout=600,
        start_new_session=True,
        check=False,
    )
    assert done.returncode == 0, f"the last latest did not load as saved: see {log.name}"
    print("kills (last save started, where its save was, latest, partial folders):", *landed, sep="\n  ")
    print(f"CPU time of the {KILLS} killed runs: {cpu:.0f} s")
    # The kills landed inside saves: some left a save started after the one `latest` names.
    assert sum(last > int(name.split("_")[1]) for last, _, name, _ in landed) >= 3, landed


def test_save_by_deadline_arithmetic_and_sources():
    from uniapl_megatron.models.arch import ConfigError
    from uniapl_megatron.trainer.checkpoint import SaveDeadline, job_end_time, parse_end_time

    assert job_end_time("auto", {"SLURM_JOB_END_TIME": "1793718000"}) == 1793718000
    assert job_end_time("none", {"SLURM_JOB_END_TIME": "1793718000"}) is None
    assert job_end_time("auto", {}) is None  # no job, no deadline
    assert job_end_time("2026-11-03T17:00:00", {}) == datetime.datetime(2026, 11, 3, 17).timestamp()
    with pytest.raises(ConfigError, match="train.job_end_time='soon'"):
        parse_end_time("soon")
    d = SaveDeadline(1000.0, margin_s=10.0)
    for s in (3.0, 5.0, 4.0):
        d.record_step(s)
    # The longest recent step (5) + the last save (20) + the margin (10) must fit before the end.
    assert not d.due(20.0, now=964.0) and d.due(20.0, now=965.0)
    assert not SaveDeadline(None, 10.0).due(20.0, now=1e12)


def test_trainer_saves_and_stops_when_the_job_end_is_near(tmp_path):
    """A run whose job ends before another step and save would fit: it saves the step it has, at once (not at
    save_every), writes health/exit.json with reason deadline (the launcher requeues on it) and exits 0."""
    from uniapl_megatron.demo import prepare
    from uniapl_megatron.trainer.checkpoint import latest_checkpoint

    a = prepare(tmp_path / "assets", train_rows=50)
    out = tmp_path / "run"
    end = time.time() + 3600  # with a 3600 s margin: due after the first step
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "uniapl_megatron.cli",
            "train",
            str(ROOT / "examples" / "tiny_cpu.yaml"),
            f"model.hf_path={a['student']}",
            "rollout=null",
            "discriminator=null",
            "objective.algorithm=sft",
            f"data.demo_paths=[{a['data']}]",
            "data.prompt_paths=[]",
            "data.eval_prompt_paths=[]",
            "data.prompts_per_step=0",
            "data.demos_per_step=2",
            "train.steps=50",
            "train.save_every=1000",
            f"train.job_end_time={end:.0f}",
            "train.save_margin_s=3600",
            f"train.output_dir={out}",
            "train.tensorboard=false",
            "train.plot=false",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "job end near: saved step 1, exiting" in r.stdout, r.stdout[-2000:]
    assert json.loads((out / "health" / "exit.json").read_text())["reason"] == "deadline"
    assert latest_checkpoint(out).name == "step_000001"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_bad_settings_are_refused_with_the_field(tmp_path):
    from types import SimpleNamespace

    from uniapl_megatron.models.arch import ConfigError
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.checkpoint import Checkpointer
    from uniapl_megatron.trainer.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {hf_path: x}\n")
    for override, message in [
        ("train.hang_timeout_s=1800", "train.hang_timeout_s=1800.0: expected 0 .* below 1800"),
        ("train.ckpt_optim_format=flat", "train.ckpt_optim_format: expected one of .*got 'flat'"),
        ("train.job_end_time=tomorrow", "train.job_end_time='tomorrow': expected auto, none"),
        ("train.save_margin_s=-1", "train.save_margin_s: expected a number >= 0.*got -1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(cfg, [override])
    # dp_reshardable optimizer state saved at TP2 x PP2 is refused at TP1, naming what changed.
    ck = tmp_path / "step_000003"
    ck.mkdir()
    (ck / "trainer_state.json").write_text(
        json.dumps(
            {
                "step": 3,
                "optimizer_format": "dp_reshardable",
                "layout": {
                    "tensor_model_parallel_size": 2,
                    "pipeline_model_parallel_size": 2,
                    "virtual_pipeline_model_parallel_size": None,
                    "expert_model_parallel_size": 1,
                    "context_parallel_size": 1,
                },
            }
        )
    )
    student = SimpleNamespace(parallel=ParallelConfig())  # only its layout is read before refusing
    with pytest.raises(
        ConfigError,
        match=r"dp_reshardable.*tensor_model_parallel_size 2 -> 1, "
        r"pipeline_model_parallel_size 2 -> 1.*fully_reshardable",
    ):
        Checkpointer(tmp_path).load(ck, student)
