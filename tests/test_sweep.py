"""`uniapl sweep`: the sweep file, the table's statistics, and real sweeps on the tiny student.

- The sweep file is checked before anything runs (bad preset, unknown key, output_dir override, missing input).
- The table's mean / sd over seeds and the difference to GRPO with its standard error, against numbers
  computed here by hand.
- A 2-cell local sweep (grpo, uniapl) killed during its second cell and rerun: the first cell is not rerun,
  the table has both rows; the console of training carries no vLLM lines (they are in run.log), the summary
  has the held-out keys, metric names have one prefix, and the evaluator's held-out reward (exported model,
  fresh engine) equals the trainer's own last measurement.
- One cell through the Slurm runner on the local cluster: training and evaluation are two jobs, the second
  depending on the first.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from uniapl_megatron.eval.tables import Result, build_table, to_markdown
from uniapl_megatron.sweep import load_spec, plan
from uniapl_megatron.sweep.spec import SweepError, expand, output_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"


def _write(tmp_path: Path, doc: dict, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _minimal(tmp_path: Path, **kw) -> dict:
    return {
        "name": "t",
        "base": str(TINY),
        "output_dir": str(tmp_path / "out"),
        "presets": ["grpo"],
        "students": {"tiny": {}},
        **kw,
    }


# ---------------------------------------------------------------- the sweep file


@pytest.mark.parametrize(
    "change, message",
    [
        ({"presets": ["grpo", "ppo"]}, "unknown preset 'ppo'"),
        ({"sedes": [1]}, "unknown key(s) sedes"),
        ({"overrides": ["train.output_dir=/x"]}, "train.output_dir is set by the sweep"),
        ({"overrides": ["train.steps"]}, "'train.steps' is not section.key=value"),
        ({"seeds": [1, 1]}, "seeds: expected a list of distinct integers"),
        ({"evaluators": {"mmlu": {}}}, "unknown evaluator 'mmlu'"),
        ({"students": {"tiny": {"warmup": "sft"}}}, "students.tiny.warmup: expected a list"),
    ],
)
def test_bad_sweep_files_name_the_field(tmp_path, change, message):
    path = _write(tmp_path, _minimal(tmp_path, **change))
    with pytest.raises(SweepError) as e:
        load_spec(path)
    assert str(path) in str(e.value) and message in str(e.value), e.value


def test_cells_expand_in_order_with_overrides_and_are_checked(tmp_path, assets):
    # The inputs exist (the fixture's), so what is refused below is the bad override, then the missing model.
    doc = _minimal(
        tmp_path,
        presets={"grpo": ["optim.lr=0.5"], "sft->grpo": []},
        seeds=[3, 4],
        overrides=_tiny_overrides(assets),
        students={"tiny": {"overrides": ["train.steps=7"], "warmup": ["objective.algorithm=sft"]}},
        cells={"tiny/grpo/4": ["optim.lr=0.25"]},
    )
    spec = load_spec(_write(tmp_path, doc))
    cells = expand(spec, output_path(spec))
    assert [c.id for c in cells] == [
        "tiny__warmup",
        "tiny__grpo__s3",
        "tiny__grpo__s4",
        "tiny__sft-to-grpo__s3",
        "tiny__sft-to-grpo__s4",
    ]
    last = cells[2].overrides
    assert last.index("optim.lr=0.5") < last.index("train.seed=4") < last.index("optim.lr=0.25")
    assert f"model.hf_path={output_path(spec) / 'cells' / 'tiny__warmup' / 'hf'}" in last
    # every cell's config is loaded before anything runs: a bad override is named with its cell
    bad = _write(tmp_path, {**doc, "cells": {"tiny/grpo/4": ["optim.lr=fast"]}}, "bad.yaml")
    with pytest.raises(SweepError, match=r"cell tiny/grpo/seed4: .*optim.lr"):
        plan(load_spec(bad))
    missing = _write(
        tmp_path,
        _minimal(
            tmp_path, overrides=_tiny_overrides(assets), students={"tiny": {"overrides": ["model.hf_path=/nowhere"]}}
        ),
        "missing.yaml",
    )
    with pytest.raises(SweepError, match="missing input.*model.hf_path=/nowhere"):
        plan(load_spec(missing))


def test_shipped_sweep_files_expand():
    mini = load_spec(ROOT / "examples" / "mini_repro.yaml")
    cells = expand(mini, output_path(mini))
    assert len(cells) == 1 + 10 * 3 and cells[0].preset == "warmup"
    assert all(c.warmup_of == cells[0].id for c in cells[1:])
    paper = load_spec(ROOT / "examples" / "paper_tables.yaml")
    cells = expand(paper, output_path(paper))
    assert len(cells) == 3 * 10 * 3 and {c.base.name for c in cells} == {
        "qwen3_0p6b_32x8.yaml",
        "qwen3_4b_32x8.yaml",
        "qwen3_8b_32x8.yaml",
    }
    assert next(c.base.name for c in cells if c.student == "Qwen3-8B") == "qwen3_8b_32x8.yaml"
    assert list(paper.evaluators) == ["ifeval", "ifbench"]


# ---------------------------------------------------------------- the table over seeds


def test_table_mean_sd_and_delta_to_grpo_over_seeds():
    scores = {
        ("grpo", "A"): [0.40, 0.50, 0.45],
        ("grpo", "B"): [0.20, 0.30, 0.10],
        ("uniapl", "A"): [0.60, 0.55, 0.50],
        ("uniapl", "B"): [0.30, 0.20, 0.40],
    }
    results = [Result(a, "tiny", b, v, f"f{i}", seed=i) for (a, b), vs in scores.items() for i, v in enumerate(vs)]
    table = build_table(results, ["A", "B"])
    rows = {r["algorithm"]: r for r in table.rows}
    # by hand: per-seed averages, their mean and sample sd; the difference's standard error
    avg = {a: [50 * (scores[(a, "A")][i] + scores[(a, "B")][i]) for i in range(3)] for a in ("grpo", "uniapl")}
    for a, per_seed in avg.items():
        assert rows[a]["scores"]["A"] == pytest.approx(100 * sum(scores[(a, "A")]) / 3)
        assert rows[a]["sd"]["B"] == pytest.approx(100 * statistics.stdev(scores[(a, "B")]))
        assert rows[a]["average"] == pytest.approx(sum(per_seed) / 3)
        assert rows[a]["average_sd"] == pytest.approx(statistics.stdev(per_seed))
    se = math.sqrt(statistics.variance(avg["uniapl"]) / 3 + statistics.variance(avg["grpo"]) / 3)
    assert rows["uniapl"]["delta_grpo"] == pytest.approx(sum(avg["uniapl"]) / 3 - sum(avg["grpo"]) / 3)
    assert rows["uniapl"]["delta_grpo_se"] == pytest.approx(se)
    md = to_markdown(table)
    assert md.splitlines()[0] == "| Student | Method | A | B | Avg. | Δ GRPO (± s.e.) | Seeds |"
    assert (
        f"| tiny | UniAPL | 55.00 ± 5.00 | 30.00 ± 10.00 | 42.50 ± {statistics.stdev(avg['uniapl']):.2f} | "
        f"+10.00 ± {se:.2f} | 3 |" in md
    )
    with pytest.raises(ValueError, match=r"two results for tiny / grpo / A \(seed 1\)"):
        build_table(results + [Result("grpo", "tiny", "A", 0.1, "dup", seed=1)])


# ---------------------------------------------------------------- real sweeps on the tiny student


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from uniapl_megatron.demo import prepare

    out = prepare(tmp_path_factory.mktemp("assets"), train_rows=200)
    small = Path(out["eval_data"]).with_name("heldout_small.jsonl")  # 12 held-out prompts keep the test short
    small.write_text("".join(Path(out["eval_data"]).read_text().splitlines(keepends=True)[:12]))
    return {**out, "eval_data": str(small)}


def _tiny_overrides(assets: dict[str, str]) -> list[str]:
    return [
        f"model.hf_path={assets['student']}",
        f"discriminator.path={assets['discriminator']}",
        f"data.demo_paths=[{assets['data']}]",
        f"data.prompt_paths=[{assets['data']}]",
        f"data.eval_prompt_paths=[{assets['eval_data']}]",
        "data.prompts_per_step=2",
        "data.demos_per_step=2",
        "sampling.group_size=2",
        "sampling.max_new_tokens=6",
        "train.steps=2",
        "train.save_every=2",
        "train.eval_samples=2",
        "train.tensorboard=false",
        "train.plot=false",
        "train.log_samples=0",
    ]


def _sweep(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "uniapl_megatron.cli", "sweep", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_local_sweep_killed_in_its_second_cell_resumes(assets, tmp_path):
    out = tmp_path / "out"
    path = _write(
        tmp_path,
        {
            "name": "ci",
            "base": str(TINY),
            "output_dir": str(out),
            "presets": ["grpo", "uniapl"],
            "students": {"tiny": {}},
            "seeds": [5],
            "overrides": _tiny_overrides(assets),
        },
    )
    first, second = out / "cells" / "tiny__grpo__s5", out / "cells" / "tiny__uniapl__s5"
    proc = _sweep(str(path), start_new_session=True)
    deadline = time.monotonic() + 900
    while not (second / "train.log").is_file():  # the second cell has started
        assert proc.poll() is None, f"the sweep ended before its second cell:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "the second cell did not start within 900 s"
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and everything it started, as a crash would
    proc.wait()
    killed_output = proc.stdout.read()
    result = out / "results" / "tiny__grpo__s5.json"
    assert result.is_file() and not (out / "results" / "tiny__uniapl__s5.json").exists(), killed_output
    before = result.stat().st_mtime_ns

    rerun = _sweep(str(path))
    text, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, text
    assert re.search(r"\[1/2\] tiny/grpo/seed5: finished earlier .* skipped", text), text
    assert result.stat().st_mtime_ns == before
    assert (first / "train.log").read_text().count("\n==== ") == 1, "the finished cell was trained again"
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [r["algorithm"] for r in rows] == ["grpo", "uniapl"], rows
    assert {p.name for p in (out / "curves" / "tiny").iterdir()} == {"grpo.png", "uniapl.png", "heldout_all.png"}

    records = {r["algorithm"]: r for f in (out / "results").glob("*.json") for r in json.loads(f.read_text())}
    for algo, r in records.items():
        assert r["cell"] == f"tiny__{algo}__s5" and re.fullmatch(r"[0-9a-f]{16}", r["config_hash"]), r
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", r["git_commit"]), r
        assert r["curve"]["eval/heldout_reward"][0][0] == 0  # measured before the first step
        # the evaluator (exported model, a fresh engine) draws what the trainer drew at its last step
        assert r["score"] == pytest.approx(r["train"]["heldout_reward_last"], abs=1e-4), r
        assert {"heldout_reward_first", "heldout_reward_last", "heldout_gain"} <= set(r["train"])
    console = (second / "train.log").read_text()
    assert "RotaryEmbedding" not in console and "[inplace.py" not in console, console[-3000:]
    assert "RotaryEmbedding: Failed to load weights" in (second / "run" / "run.log").read_text()
    metrics = [json.loads(x) for x in (second / "run" / "metrics.jsonl").read_text().splitlines()]
    names = {k for m in metrics for k in m}
    assert "disc/loss" in names and not [k for k in names if re.match(r"(\w+)/\1/", k)], names
    assert not (first / "run" / "checkpoints").exists()  # keep_checkpoints: false


def _ifbench_rows(n: int) -> list[dict]:
    """IFBench test rows whose checkers need no nltk data beyond what the packages ship."""
    from uniapl_megatron.rewards import ifbench

    needs_data = {"ratio:stop_words", "words:start_verb"}
    return [r for r in ifbench.load_ifbench_prompts() if not needs_data & set(r["instruction_id_list"])][:n]


@pytest.mark.parametrize("name,label", [("ifeval", "IFEval"), ("ifbench", "IFBench")])
def test_tool_evaluator_scores_through_the_tool(assets, tmp_path, name, label):
    """The registered `ifeval` / `ifbench` evaluators run tools/eval_ifeval.py --benchmark <name> on a model folder
    and read its score back (here 3 of the benchmark's prompts and the torch engine, to stay cheap)."""
    from uniapl_megatron.sweep.evaluators import EvalContext, build_evaluator

    prompts = tmp_path / "prompts.jsonl"
    if name == "ifeval":
        prompts.write_text("".join(Path(assets["eval_data"]).read_text().splitlines(keepends=True)[:3]))
    else:
        prompts.write_text("".join(json.dumps(r) + "\n" for r in _ifbench_rows(3)))
    ev = build_evaluator(name, {"args": ["--prompts", str(prompts), "--engine", "torch", "--max-new-tokens", "4"]})
    cell = {"id": "c", "preset": "grpo", "student": "tiny"}
    got = ev.evaluate(EvalContext(cell, Path(assets["student"]), None, tmp_path / "eval"))
    written = json.loads((tmp_path / "eval" / f"{name}.json").read_text())
    assert ev.benchmark == label == written["benchmark"]
    assert got.score == written["score"] == written["metrics"]["prompt_strict"]
    assert written["algorithm"] == "grpo" and written["student"] == "tiny" and written["metrics"]["num_prompts"] == 3
    with pytest.raises(SweepError, match=f"evaluators.{name}: bad options"):
        build_evaluator(name, {"prompts": "x"})


def test_heldout_prompts_that_are_trained_on_are_refused(assets, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "uniapl_megatron.cli",
            "train",
            str(TINY),
            *_tiny_overrides(assets),
            f"data.eval_prompt_paths=[{assets['data']}]",
            f"train.output_dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2 and "held-out prompts are also training prompts" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------- Slurm


def _slurm_env() -> dict[str, str]:
    env = {**os.environ, "SLURM_CONF": os.environ.get("SLURM_CONF", "/tmp/uniapl-slurm/slurm.conf")}
    ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=20)
    assert "is UP" in ping.stdout, 'no local Slurm cluster answers: run `eval "$(.ci/slurm_up.sh)"` first'
    return env


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_runner_chains_evaluation_after_training(assets, tmp_path):
    env = _slurm_env()
    out = tmp_path / "out"
    cpus = str(os.cpu_count() or 1)
    path = _write(
        tmp_path,
        {
            "name": "ci-slurm",
            "base": str(TINY),
            "output_dir": str(out),
            "presets": ["grpo"],
            "seeds": [2],
            "students": {"tiny": {}},
            "overrides": _tiny_overrides(assets),
            "runner": "slurm",
            "slurm": {
                "train_args": ["--gpus-per-node=0", "--ntasks-per-node=1", f"--cpus-per-task={cpus}", "--time=20"],
                "eval_args": [f"--cpus-per-task={cpus}", "--time=20"],
            },
        },
    )
    jobs: list[str] = []
    try:
        r = subprocess.run(
            [sys.executable, "-m", "uniapl_megatron.cli", "sweep", str(path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        ids = json.loads((out / "cells" / "tiny__grpo__s2" / "slurm.json").read_text())
        jobs = [ids["train"], ids["finish"]]
        info = subprocess.run(
            ["scontrol", "show", "job", "-o", ids["finish"]], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert f"Dependency=afterok:{ids['train']}" in info, info
        # the same command again: the cell's jobs are queued, so nothing is resubmitted; --wait then collects
        r = subprocess.run(
            [sys.executable, "-m", "uniapl_megatron.cli", "sweep", str(path), "--wait"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert r.returncode == 0 and "not resubmitted" in r.stdout, r.stdout + r.stderr
        record = json.loads((out / "results" / "tiny__grpo__s2.json").read_text())[0]
        assert record["algorithm"] == "grpo" and 0.0 <= record["score"] <= 1.0
        assert "| tiny | GRPO |" in (out / "table.md").read_text()
    finally:
        for job in jobs:
            subprocess.run(["scancel", job], env=env, capture_output=True)
