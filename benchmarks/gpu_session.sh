#!/bin/bash
# Every GPU measurement of this project, for a lent single-GPU machine that has torch and transformers but not
# megatron-core (see ../shared/notes/gpu-device.md). Carry the megatron-core wheel:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl megatron-core==0.16.1
# then run this from the repository root with $OUT set; each benchmark's output lands in $OUT as <part>.txt
# (its JSON line last) and <part>.err.
#   train_step  benchmarks/train_step.py at the Qwen3-0.6B shape ($SHAPES), ours vs transformers, bf16
#               (targets: >= 1.5x transformers' tokens/s, <= 60% of its peak memory)
#   logprob     benchmarks/logprob_memory.py: the log-prob head vs full logits, 16,384 tokens, fp32
#   rollout     benchmarks/rollout.py: the torch fallback engine vs transformers `generate` (dynamic and static
#               cache; transformers compiles the static one itself on a GPU), 0.6B shape, bf16 (target >= 10x)
# $PARTS picks parts (default: all three, in that order) so that a session can split them over calls of at most
# 10 minutes each, e.g. PARTS="train_step logprob" then PARTS=rollout. Each part has its own time limit
# (TRAIN_STEP_S, LOGPROB_S, ROLLOUT_S); compiling the fallback engine's decode step takes minutes, so rollout
# gets the longest.
set -u
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
[ -d /tmp/site/megatron ] || pip install -q --no-deps --target /tmp/site .whl/megatron_core-*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
for part in ${PARTS:-train_step logprob rollout}; do
    case "$part" in
        train_step) cmd=(python benchmarks/train_step.py --shape "${SHAPES:-0.6b}"); limit=${TRAIN_STEP_S:-240} ;;
        logprob) cmd=(python benchmarks/logprob_memory.py --repeats 3); limit=${LOGPROB_S:-120} ;;
        rollout) cmd=(python benchmarks/rollout.py --out "$OUT/rollout.json"); limit=${ROLLOUT_S:-420} ;;
        *) echo "unknown part $part (expected train_step, logprob, rollout)" >&2; exit 2 ;;
    esac
    echo "== $part: ${cmd[*]} (limit ${limit} s)"
    timeout "$limit" "${cmd[@]}" > "$OUT/$part.txt" 2> "$OUT/$part.err"
    echo "exit $?"
    tail -1 "$OUT/$part.txt"
done
