#!/bin/bash
# Every GPU measurement of this project in one run, for a lent single-GPU machine that has torch and
# transformers but not megatron-core (see ../shared/notes/gpu-device.md). Carry the megatron-core wheel:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl megatron-core==0.16.1
# then run this from the repository root with $OUT set; each benchmark's output lands in $OUT.
# Compiling the fallback engine's decode step takes minutes, so rollout.py gets the longest limit.
set -u
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
[ -d /tmp/site/megatron ] || pip install -q --no-deps --target /tmp/site .whl/megatron_core-*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout "${TRAIN_STEP_S:-240}" python benchmarks/train_step.py > "$OUT/train_step.txt" 2> "$OUT/train_step.err"
tail -1 "$OUT/train_step.txt"
timeout "${ROLLOUT_S:-300}" python benchmarks/rollout.py --out "$OUT/rollout.json" > "$OUT/rollout.txt" 2> "$OUT/rollout.err"
tail -1 "$OUT/rollout.txt"
