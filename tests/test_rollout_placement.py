"""Where rollout engines run (rollout/placement.py), as pure functions: 8-GPU nodes with rollout TP 1/2/4/8,
a CPU machine, GPUs bound one per task by srun, disaggregated servers, and the layouts that are refused."""

from __future__ import annotations

import pytest

from uniapl_megatron.rollout.placement import (
    PlacementError,
    place_colocated,
    place_disaggregated,
    server_devices,
    shard_device,
    split_bounds,
    visible_devices,
)

NODE = [str(i) for i in range(8)]


@pytest.mark.parametrize("rollout_tp", [1, 2, 4, 8])
def test_colocated_engines_on_two_8_gpu_nodes_use_only_their_ranks_gpus(rollout_tp):
    world, per_node = 16, 8
    places = [place_colocated(r, world, r % per_node, per_node, NODE, 2, rollout_tp) for r in range(world)]
    assert {p.num_engines for p in places} == {world // rollout_tp}
    by_engine: dict[int, list] = {}
    for r, p in enumerate(places):
        assert p.device == f"cuda:{r % per_node}"  # every rank's shard on its own GPU
        assert r in p.ranks and p.ranks[p.shard] == r and len(p.ranks) == rollout_tp
        by_engine.setdefault(p.engine, []).append(r)
    for ranks in by_engine.values():
        views = {places[r].ranks for r in ranks}
        assert views == {tuple(ranks)}  # all shards agree on who the engine is
        assert len({r // per_node for r in ranks}) == 1  # one node
        gpus = places[ranks[0]].node_gpus
        assert gpus == tuple(r % per_node for r in ranks)
        # An engine never uses a GPU of a rank outside it: the ranks owning its GPUs are exactly its ranks.
        node = ranks[0] // per_node
        assert {node * per_node + g for g in gpus} == set(ranks)
    # Training TP 2: an engine's weights come from its ranks' training TP groups.
    assert places[0].refit_ranks == ((0, 1) if rollout_tp <= 2 else tuple(range(rollout_tp)))


def test_cpu_machine_and_gpus_bound_one_per_task():
    cpu = [place_colocated(r, 2, r, 2, [], 1, 1) for r in range(2)]
    assert [(p.engine, p.device, p.node_gpus) for p in cpu] == [(0, "cpu", ()), (1, "cpu", ())]
    one = place_colocated(5, 8, 5, 8, ["5"], 1, 2)  # srun --gpus-per-task=1: each task sees its own GPU
    assert one.device == "cuda:0" and one.ranks == (4, 5) and one.shard == 1
    assert shard_device(3, 8, NODE) == "cuda:3"
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4) == ["4", "5", "6", "7"]
    assert visible_devices({}, 2) == ["0", "1"] and visible_devices({}, 0) == []


@pytest.mark.parametrize(
    "args, msg",
    [
        ((0, 8, 0, 8, NODE, 1, 3), "does not divide the 8 training ranks"),
        ((0, 16, 0, 4, NODE[:4], 1, 8), "would span two nodes"),
        ((0, 8, 0, 8, NODE[:4], 1, 1), "8 ranks on this node but 4 visible GPUs"),
        ((0, 8, 0, 8, ["0", "0", "1", "2", "3", "4", "5", "6"], 1, 1), "names a GPU twice"),
        ((0, 8, 0, 8, NODE, 1, 0), "rollout.tensor_parallel_size: expected an integer >= 1"),
    ],
)
def test_layouts_that_cannot_be_placed_are_refused_with_the_numbers(args, msg):
    with pytest.raises(PlacementError, match=msg):
        place_colocated(*args)


def test_disaggregated_servers_fill_every_rollout_gpu():
    assert place_disaggregated(2, 8, 2) == [(n, (g, g + 1)) for n in range(2) for g in range(0, 8, 2)]
    assert place_disaggregated(3, 0, 4) == [(0, ()), (1, ()), (2, ())]  # CPU nodes: one each
    with pytest.raises(PlacementError, match="does not divide the 8 GPUs"):
        place_disaggregated(1, 8, 3)
    assert server_devices(2, 2, "0,1,2,3,4,5,6,7") == ["4", "5"]
    assert server_devices(0, 2, "6,7") == ["6", "7"]  # Slurm bound this task's two GPUs already
    assert server_devices(0, 2, None) is None
    with pytest.raises(PlacementError, match="needs GPUs 8..9 of the node"):
        server_devices(4, 2, "0,1,2,3,4,5,6,7")


def test_prompt_shares_are_contiguous_and_even():
    assert split_bounds(8, 3) == [0, 2, 5, 8]
    assert split_bounds(2, 4) == [0, 0, 1, 1, 2]  # more engines than prompts: some get none
    with pytest.raises(ValueError):
        split_bounds(3, 0)


def test_the_trainer_refuses_engines_it_cannot_place_or_run(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.rollout import RolloutConfig
    from uniapl_megatron.trainer.rollout_step import place_engines

    (tmp_path / "config.json").write_text('{"vocab_size": 8}')
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")

    def cfg(**kw):
        return SimpleNamespace(rollout=RolloutConfig(model_path=str(tmp_path), **kw), parallel=ParallelConfig())

    p = place_engines(cfg(), 1, 2)
    assert (p.engine, p.num_engines, p.device) == (1, 2, "cpu")
    assert place_engines(cfg(mode="disaggregated", num_nodes=1), 1, 2) is None
    for kw, msg in (
        (dict(engine="torch", tensor_parallel_size=2), "the torch engine has no tensor parallelism"),
        (dict(kv_cache_bytes=0), "rollout.kv_cache_bytes: 0 lets each colocated vLLM engine"),
        (dict(tensor_parallel_size=4), "does not divide the 2 training ranks"),
    ):
        with pytest.raises(PlacementError, match=msg):
            place_engines(cfg(**kw), 1, 2)


def test_uniapl_train_refuses_before_building_anything(tmp_path):
    import subprocess
    import sys

    from _models import tiny_qwen3
    from _runs import TINY

    model = tiny_qwen3(tmp_path / "m", layers=1)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "uniapl_megatron.cli",
            "train",
            str(TINY),
            f"model.hf_path={model}",
            "rollout.engine=torch",
            "rollout.tensor_parallel_size=2",
            f"train.output_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: rollout.tensor_parallel_size=2: the torch engine has no tensor parallelism" in r.stderr
