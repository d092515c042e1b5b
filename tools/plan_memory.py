#!/usr/bin/env python
"""Will this recipe's parallel layout fit the GPUs? Per-GPU memory by part, before launching.

    python tools/plan_memory.py examples/qwen3_8b_32x8.yaml --nodes 32 --gpus-per-node 8
    python tools/plan_memory.py CONFIG.yaml parallel.tensor_model_parallel_size=1 --gpu-mem-gib 79.6

Reads the recipe the way `uniapl train` does (sections, `section.key=value` overrides, relative
paths against the file's folder) and plans with uniapl_megatron.plan_memory. Exit status: 0 fits
(or GPU memory unknown: layout checked, fit not), 1 bad input or an inconsistent layout, 2 does not
fit (the message lists every part). `--shell` is for slurm/_launch.sh: the plan goes to stderr and
stdout gets shell assignments (output folder, resume, placement, rollout servers per node).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

from uniapl_megatron.plan_memory import (
    GIB,
    DoesNotFit,
    Layout,
    MemoryPlan,
    ModelShape,
    PlanError,
    RolloutShape,
    TrainShape,
    check,
    known_shape,
    param_count,
    plan,
)

# Keys the trainer resolves against the config file's folder (uniapl_megatron/trainer/config.py).
PATH_KEYS = (("model", "hf_path"), ("train", "output_dir"), ("discriminator", "path"))
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The recipe YAML with `section.key=value` overrides (values parsed as YAML), paths resolved."""
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PlanError(f"{path}: cannot read the config ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise PlanError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise PlanError(f"{path}: expected a mapping of sections at the top level, got {type(cfg).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        keys = key.strip().split(".")
        if not sep or any(not k for k in keys):
            raise PlanError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise PlanError(f"override {item!r}: the value is not valid YAML") from None
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise PlanError(f"override {item!r}: '{k}' is a {type(node).__name__}, not a section")
        node[keys[-1]] = value
    base = Path(path).resolve().parent
    for sec, key in PATH_KEYS:
        p = (cfg.get(sec) or {}).get(key) if isinstance(cfg.get(sec), dict) else None
        if isinstance(p, str) and p and not Path(p).is_absolute() and not p.startswith("@"):
            cfg[sec][key] = str((base / p).resolve())
    return cfg


def _field(cfg: dict, dotted: str, kind: type, default, source: str):
    """cfg['a']['b'] for 'a.b', type-checked; `default` when absent or null."""
    node = cfg
    for k in dotted.split("."):
        if not isinstance(node, dict) or node.get(k) is None:
            return default
        node = node[k]
    if kind is float and isinstance(node, int) and not isinstance(node, bool):
        node = float(node)
    if (kind is int and isinstance(node, bool)) or not isinstance(node, kind):
        raise PlanError(f"{source}: '{dotted}' must be {kind.__name__}, got {node!r}")
    return node


def model_shape(hf_path: str, what: str) -> tuple[ModelShape | None, str]:
    """(shape, note) from <hf_path>/config.json, or the built-in table for a known Qwen3 name."""
    cfg_file = Path(hf_path) / "config.json"
    if cfg_file.is_file():
        try:
            return ModelShape.from_hf_config(json.loads(cfg_file.read_text()), str(cfg_file)), ""
        except json.JSONDecodeError as e:
            raise PlanError(f"{cfg_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    known = known_shape(hf_path)
    if known:
        return (
            ModelShape.from_hf_config(known[1], f"built-in {known[0]}"),
            f"{what}: no {cfg_file}; using the public config of {known[0]}",
        )
    return None, f"{what}: no {cfg_file} and not a known Qwen3 name"


def layout(cfg: dict, world_size: int, source: str) -> Layout:
    p = "parallel."
    return Layout(
        world_size=world_size,
        tp=_field(cfg, p + "tensor_model_parallel_size", int, 1, source),
        pp=_field(cfg, p + "pipeline_model_parallel_size", int, 1, source),
        vpp=_field(cfg, p + "virtual_pipeline_model_parallel_size", int, 1, source),
        cp=_field(cfg, p + "context_parallel_size", int, 1, source),
        ep=_field(cfg, p + "expert_model_parallel_size", int, 1, source),
        sp=_field(cfg, p + "sequence_parallel", bool, False, source),
        distributed_optimizer=_field(cfg, p + "use_distributed_optimizer", bool, True, source),
    )


def train_shape(cfg: dict, source: str) -> TrainShape:
    spec = _field(cfg, "model.spec", str, "auto", source)
    return TrainShape(
        micro_batch_size=1,  # the trainer packs sequences: one row of max_tokens_per_micro_batch
        seq_length=_field(cfg, "data.max_tokens_per_micro_batch", int, 8192, source),
        recompute=_field(cfg, "model.recompute", str, "none", source),
        attention="te" if spec == "te" else "sdpa",  # auto may fall back to torch: plan for it
        dtype=_field(cfg, "model.dtype", str, "bf16", source),
        reference_model=_field(cfg, "objective.kl_coef", float, 0.0, source) > 0,
        logits_chunk_tokens=_field(cfg, "optim.chunk_tokens", int, 2048, source),
    )


def rollout_shape(cfg: dict, source: str, gpus_per_node: int = 8) -> RolloutShape | None:
    """None when the recipe has no rollout section (as for the trainer: no engine)."""
    if not cfg.get("rollout"):
        return None
    import dataclasses

    from uniapl_megatron.rollout.config import RolloutConfig

    # The trainer's defaults (rollout/config.py is the one definition of these fields).
    d = {f.name: f.default for f in dataclasses.fields(RolloutConfig)}
    r = "rollout."
    mode = _field(cfg, r + "mode", str, d["mode"], source)
    num_nodes = _field(cfg, r + "num_nodes", int, d["num_nodes"], source)
    if mode == "disaggregated" and num_nodes < 1:
        raise PlanError(f"{source}: rollout.mode=disaggregated needs rollout.num_nodes >= 1")
    dtype = _field(cfg, r + "dtype", str, d["dtype"], source)
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"{source}: rollout.dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return RolloutShape(
        engine=_field(cfg, r + "engine", str, d["engine"], source),
        mode=mode,
        tensor_parallel_size=_field(cfg, r + "tensor_parallel_size", int, d["tensor_parallel_size"], source),
        gpu_memory_utilization=_field(cfg, r + "gpu_memory_utilization", float, d["gpu_memory_utilization"], source),
        num_nodes=num_nodes if mode == "disaggregated" else 0,
        max_num_seqs=_field(cfg, r + "max_batch_size", int, d["max_batch_size"], source),
        max_model_len=_field(cfg, r + "max_model_len", int, d["max_model_len"], source),
        dtype_bytes=DTYPE_BYTES[dtype],
        kv_cache_bytes=_field(cfg, r + "kv_cache_bytes", int, d["kv_cache_bytes"], source),
        bucket_bytes=_field(cfg, r + "bucket_bytes", int, d["bucket_bytes"], source),
        gpus_per_node=gpus_per_node,
    )


def discriminator_parts(cfg: dict, source: str) -> tuple[dict[str, float], list[str]]:
    """The discriminator's resident bytes on every training GPU: each rank holds a copy and scores the samples
    of its engine share (whole model; online adds grads + AdamW)."""
    d = cfg.get("discriminator")
    if not d:
        return {}, []
    kind = _field(cfg, "discriminator.kind", str, "frozen", source)
    dtype = _field(cfg, "discriminator.dtype", str, "float32", source)
    path = _field(cfg, "discriminator.path", str, "", source)
    shape, note = model_shape(path, "discriminator") if path else (None, "discriminator: no path")
    if shape is None:
        return {}, [note + ": not counted"]
    copies = 4 if kind == "online" else 1  # online: weights, grads, AdamW m and v
    total = copies * DTYPE_BYTES.get(dtype, 4) * param_count(shape)
    return {f"discriminator ({kind}, {dtype}{', + grads + AdamW' if copies > 1 else ''}; a copy per GPU)": total}, [
        note
    ] if note else []


def engines(rollout: RolloutShape | None, lay: Layout, gpus_per_node: int, source: str) -> int:
    """How many rollout engines the job runs (rollout/placement.py places them; refused as the trainer
    would refuse them): one per rollout-TP group of training GPUs (colocated) or of rollout GPUs."""
    from uniapl_megatron.rollout.placement import PlacementError, place_colocated, place_disaggregated

    if rollout is None:
        return 0
    try:
        if rollout.mode == "disaggregated":
            return len(place_disaggregated(rollout.num_nodes, gpus_per_node, rollout.tensor_parallel_size))
        gpus = [str(i) for i in range(gpus_per_node)]
        return place_colocated(
            0, lay.world_size, 0, gpus_per_node, gpus, lay.tp, rollout.tensor_parallel_size
        ).num_engines
    except PlacementError as e:
        raise PlanError(f"{source}: {e}") from None


def plan_recipe(
    cfg: dict, source: str, nodes: int, gpus_per_node: int, gpu_bytes: float, reserve_bytes: float = 4 * GIB
) -> tuple[MemoryPlan | None, list[str]]:
    """Plan on nodes x gpus_per_node; (None, notes) when the student's shape is unknown."""
    rollout = rollout_shape(cfg, source, gpus_per_node)
    rollout_nodes = rollout.num_nodes if rollout else 0
    train_nodes = nodes - rollout_nodes
    if train_nodes < 1:
        raise PlanError(f"{source}: rollout.num_nodes={rollout_nodes} leaves no training node out of {nodes}")
    lay = layout(cfg, train_nodes * gpus_per_node, source)
    n_engines = engines(rollout, lay, gpus_per_node, source)
    placed = [f"rollout: {n_engines} {rollout.mode} engine(s) of TP={rollout.tensor_parallel_size}"] if rollout else []
    mp = lay.tp * lay.pp * lay.cp
    if lay.world_size % mp:  # checked here too: it needs no model shape
        raise PlanError(
            f"{source}: {lay.world_size} training GPUs ({train_nodes} nodes x {gpus_per_node}) "
            f"are not divisible by tensor x pipeline x context parallel = "
            f"{lay.tp} x {lay.pp} x {lay.cp} = {mp}"
        )
    hf_path = _field(cfg, "model.hf_path", str, "", source)
    if not hf_path:
        return None, [*placed, f"{source} sets no model.hf_path"]
    shape, note = model_shape(hf_path, "model")
    if shape is None:
        return None, [*placed, note]
    resident, notes = discriminator_parts(cfg, source)
    p = plan(shape, lay, train_shape(cfg, source), rollout, gpu_bytes, reserve_bytes, resident)
    return p, [n for n in [*placed, note, *notes] if n]


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="recipe YAML")
    ap.add_argument("overrides", nargs="*", help="section.key=value, as given to `uniapl train`")
    ap.add_argument("--nodes", type=int, default=1, help="nodes in the job (default 1)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    ap.add_argument(
        "--gpu-mem-gib",
        type=float,
        default=79.6,
        help="memory of one GPU in GiB (H100 80GB: 79.6, what nvidia-smi reports); "
        "0 = unknown: check the layout, skip the fit",
    )
    ap.add_argument(
        "--reserve-gib",
        type=float,
        default=4.0,
        help="per-GPU reserve for the CUDA context, NCCL buffers and fragmentation",
    )
    ap.add_argument(
        "--shell", action="store_true", help="print placement as shell assignments on stdout, the plan on stderr"
    )
    a = ap.parse_intermixed_args(argv)
    if a.nodes < 1 or a.gpus_per_node < 1:
        ap.error("--nodes and --gpus-per-node must be >= 1")
    if a.gpu_mem_gib < 0 or a.reserve_gib < 0:
        ap.error("--gpu-mem-gib and --reserve-gib must be >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    out = sys.stderr if a.shell else sys.stdout
    try:
        cfg = load_recipe(a.config, a.overrides)
        rollout = rollout_shape(cfg, a.config, a.gpus_per_node)
        capacity = a.gpu_mem_gib * GIB
        p, notes = plan_recipe(cfg, a.config, a.nodes, a.gpus_per_node, capacity or 1e30, a.reserve_gib * GIB)
        for n in notes:
            print(f"note: {n}", file=out)
        if p is None:
            print("memory plan skipped (model shape unknown); layout checked against the GPU count", file=out)
        elif not capacity:
            print("layout checked; fit not checked (GPU memory unknown)", file=out)
        else:
            check(p)
            print(p.describe(), file=out)
    except DoesNotFit as e:
        print(f"{a.config}: {e}", file=sys.stderr)
        return 2
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.shell:
        values = {
            "UNIAPL_OUTPUT_DIR": _field(cfg, "train.output_dir", str, "runs/uniapl", a.config),
            "UNIAPL_RESUME": _field(cfg, "train.resume", str, "auto", a.config),
            "UNIAPL_ROLLOUT_MODE": rollout.mode if rollout else "none",
            "UNIAPL_ROLLOUT_NODES": str(rollout.num_nodes if rollout else 0),
            # Disaggregated: rollout servers per rollout node, one per rollout-TP group of its GPUs.
            "UNIAPL_ROLLOUT_TASKS_PER_NODE": str(
                max(a.gpus_per_node // rollout.tensor_parallel_size, 1)
                if rollout and rollout.mode == "disaggregated"
                else 0
            ),
        }
        for k, v in values.items():
            print(f"{k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
