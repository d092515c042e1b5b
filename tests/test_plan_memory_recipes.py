"""The memory planner on the shipped 32 x 8 recipes and tools/plan_memory.py's recipe reader and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from test_plan_memory import H100, QWEN3_0P6B, RECIPES, ROOT, tool

from uniapl_megatron.plan_memory import PlanError, check, plan


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_fit_32_nodes_of_h100_even_without_engine_sleep(name):
    path = str(ROOT / "examples" / f"{name}.yaml")
    cfg = tool.load_recipe(path)
    p, notes = tool.plan_recipe(cfg, path, nodes=32, gpus_per_node=8, gpu_bytes=H100)
    assert p is not None, notes
    check(p)
    assert p.worst.total < 0.85 * H100  # margin for what an estimate misses
    # The recipes are chosen to fit even if the colocated engine never sleeps.
    s, _ = tool.model_shape(cfg["model"]["hf_path"], "model")
    awake = replace(tool.rollout_shape(cfg, path), sleeps=False)
    check(plan(s, tool.layout(cfg, 256, path), tool.train_shape(cfg, path), awake, H100))


@pytest.mark.slow  # imports torch and megatron-core (~5-15 s on 2 cores)
def test_recipes_load_with_the_trainers_config_loader():
    from uniapl_megatron.trainer.config import load_config

    for name in RECIPES:
        c = load_config(ROOT / "examples" / f"{name}.yaml")
        cfg = tool.load_recipe(str(ROOT / "examples" / f"{name}.yaml"))
        # The planner reads the same values, with paths resolved the same way.
        assert c.model.hf_path == cfg["model"]["hf_path"] and c.train.output_dir == cfg["train"]["output_dir"]
        assert tool.layout(cfg, 256, name).tp == c.parallel.tensor_model_parallel_size
        assert tool.train_shape(cfg, name).seq_length == c.data.max_tokens_per_micro_batch
        assert tool.rollout_shape(cfg, name).gpu_memory_utilization == c.rollout.gpu_memory_utilization


def test_discriminator_is_counted_from_its_config(tmp_path):
    (tmp_path / "disc").mkdir()
    (tmp_path / "disc" / "config.json").write_text(json.dumps(QWEN3_0P6B))
    f = tmp_path / "r.yaml"
    f.write_text(
        "model: {hf_path: Qwen/Qwen3-8B}\nparallel: {tensor_model_parallel_size: 4}\n"
        "discriminator: {kind: online, path: disc, dtype: bfloat16}\n"
    )
    p, notes = tool.plan_recipe(tool.load_recipe(str(f)), str(f), 1, 8, H100)
    assert p.worst.parts["discriminator (online, bfloat16, + grads + AdamW; a copy per GPU)"] == 4 * 2 * 596_049_920
    assert any("public config of Qwen/Qwen3-8B" in n for n in notes)


def test_load_recipe_overrides_paths_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("parallel:\n  tensor_model_parallel_size: 2\nrollout: {mode: colocated}\ntrain: {output_dir: out}\n")
    cfg = tool.load_recipe(
        str(f),
        [
            "parallel.tensor_model_parallel_size=4",
            "data.max_tokens_per_micro_batch=2048",
            "rollout.mode=disaggregated",
            "model.hf_path=m y",
        ],
    )
    assert cfg == {
        "parallel": {"tensor_model_parallel_size": 4},
        "data": {"max_tokens_per_micro_batch": 2048},
        "rollout": {"mode": "disaggregated"},
        "model": {"hf_path": str(tmp_path / "m y")},
        "train": {"output_dir": str(tmp_path / "out")},
    }  # relative to the file, as the trainer
    with pytest.raises(PlanError, match="expected section.key=value"):
        tool.load_recipe(str(f), ["parallel.tensor_model_parallel_size"])
    with pytest.raises(PlanError, match="'tensor_model_parallel_size' is a int, not a section"):
        tool.load_recipe(str(f), ["parallel.tensor_model_parallel_size.x=1"])
    f.write_text("parallel:\n  tp: [1, 2\n")
    with pytest.raises(PlanError, match=rf"{f}:\d+: not valid YAML"):
        tool.load_recipe(str(f))
    with pytest.raises(PlanError, match="cannot read the config"):
        tool.load_recipe(str(tmp_path / "missing.yaml"))
    f.write_text("parallel: {tensor_model_parallel_size: two}\nmodel: {hf_path: Qwen/Qwen3-8B}\n")
    with pytest.raises(PlanError, match="'parallel.tensor_model_parallel_size' must be int, got 'two'"):
        tool.plan_recipe(tool.load_recipe(str(f)), str(f), 1, 8, H100)
    f.write_text("rollout: {mode: disaggregated, num_nodes: 4}\n")
    with pytest.raises(PlanError, match="rollout.num_nodes=4 leaves no training node out of 4"):
        tool.plan_recipe(tool.load_recipe(str(f)), str(f), 4, 8, H100)


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan_memory.py"), *args], capture_output=True, text=True, timeout=60
    )


def test_cli_exit_codes_and_shell_output(tmp_path):
    recipe = str(ROOT / "examples" / "qwen3_8b_32x8.yaml")
    ok = _cli(recipe, "--nodes", "32")
    assert ok.returncode == 0, ok.stderr
    assert "total" in ok.stdout and "of 79.60 GiB" in ok.stdout
    refused = _cli(recipe, "parallel.tensor_model_parallel_size=1", "--nodes", "32")
    assert refused.returncode == 2
    assert "layout does not fit the GPU" in refused.stderr and "gradients" in refused.stderr
    bad = _cli(recipe, "parallel.tensor_model_parallel_size=3", "--nodes", "32")
    assert bad.returncode == 1 and "not divisible" in bad.stderr
    sh = _cli(
        recipe, "rollout.mode=disaggregated", "rollout.num_nodes=8", "--nodes", "32", "--gpu-mem-gib", "0", "--shell"
    )
    assert sh.returncode == 0, sh.stderr
    assert sh.stdout.splitlines() == [
        f"UNIAPL_OUTPUT_DIR={ROOT}/runs/qwen3_8b_32x8",
        "UNIAPL_RESUME=auto",
        "UNIAPL_ROLLOUT_MODE=disaggregated",
        "UNIAPL_ROLLOUT_NODES=8",
        "UNIAPL_ROLLOUT_TASKS_PER_NODE=4",
    ]  # 8 GPUs / rollout TP 2
    f = tmp_path / "local.yaml"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"hidden_size": 64,')
    f.write_text("model: {hf_path: m}\n")
    broken = _cli(str(f))
    assert broken.returncode == 1 and "config.json:1: not valid JSON" in broken.stderr
