"""The part registries: the config's Literal choices are exactly the registered names, an unknown name is refused
with the names there are, and what a part can do is in its protocol (no probing by the trainer). Builds nothing
heavy: no engine or model is started."""

from __future__ import annotations

import typing

import pytest

from uniapl_megatron.discriminator import (
    DISCRIMINATORS,
    Discriminator,
    DiscriminatorConfig,
    DiscriminatorError,
    build_discriminator,
)
from uniapl_megatron.registry import Registry
from uniapl_megatron.rewards import RewardBase, RewardConfigError, build_reward
from uniapl_megatron.rollout import ENGINES, EngineBase, RolloutConfig, RolloutConfigError, start_engine
from uniapl_megatron.rollout.base import RolloutEngine


def _choices(cls: type, name: str) -> list[str]:
    return sorted(typing.get_args(typing.get_type_hints(cls)[name]))


def test_config_choices_are_the_registered_names() -> None:
    assert ENGINES.names() == _choices(RolloutConfig, "engine") == ["torch", "vllm"]
    assert DISCRIMINATORS.names() == _choices(DiscriminatorConfig, "kind") == ["frozen", "online", "polar"]


def test_an_unknown_name_is_refused_naming_the_choices() -> None:
    with pytest.raises(RolloutConfigError, match=r"rollout\.engine.*'vllm', 'torch', got 'sglang'"):
        RolloutConfig(engine="sglang", model_path="m")  # the config refuses it first
    cfg = RolloutConfig(model_path="m")
    cfg.engine = "sglang"  # past the config's check, the registry refuses it too
    with pytest.raises(
        RolloutConfigError,
        match=r"rollout\.engine: unknown rollout engine 'sglang'; available: "
        r"torch, vllm",
    ):
        start_engine(cfg)
    disc = DiscriminatorConfig(path="d")
    disc.kind = "gail"
    with pytest.raises(
        DiscriminatorError,
        match=r"discriminator\.kind: unknown discriminator kind 'gail'; "
        r"available: frozen, online, polar",
    ):
        build_discriminator(disc)
    with pytest.raises(RewardConfigError, match="unknown reward 'nope'; available: .*ifeval"):
        build_reward("nope")


def test_a_name_registers_once() -> None:
    reg: Registry[int] = Registry("widget", KeyError)
    reg.register("a")(1)
    with pytest.raises(KeyError, match="widget 'a' is registered twice"):
        reg.add("a", 2)
    assert reg.get("a") == 1 and "a" in reg and "b" not in reg


def test_capabilities_are_in_the_protocols() -> None:
    engine_members = {n for n in vars(RolloutEngine) if not n.startswith("_")} | set(
        typing.get_type_hints(RolloutEngine)
    )
    for name in ENGINES.names():
        cls = ENGINES.get(name)
        assert issubclass(cls, EngineBase)
        assert all(hasattr(cls, m) for m in engine_members), sorted(m for m in engine_members if not hasattr(cls, m))
    assert ENGINES.get("vllm").receives_broadcast and not ENGINES.get("torch").receives_broadcast
    with pytest.raises(Exception, match="tensor parallelism"):
        ENGINES.get("torch").check_colocated(RolloutConfig(engine="torch", model_path="m", tensor_parallel_size=2))
    with pytest.raises(Exception, match="kv_cache_bytes"):
        ENGINES.get("vllm").check_colocated(RolloutConfig(model_path="m", kv_cache_bytes=0))

    trainable = {name: DISCRIMINATORS.get(name).trainable for name in DISCRIMINATORS.names()}
    assert trainable == {"frozen": False, "online": True, "polar": False}
    frozen = DISCRIMINATORS.get("frozen").__new__(DISCRIMINATORS.get("frozen"))  # its defaults need no model
    assert isinstance(frozen, Discriminator)
    assert frozen.update(0, ["p"], ["r"], ["c"]) == {} and frozen.state_dict() == {}

    reward = build_reward("ifeval", timeout_s=0)  # in this process: the base's no-ops
    assert isinstance(reward, RewardBase) and reward.take_stats() == {}
    reward.close()
