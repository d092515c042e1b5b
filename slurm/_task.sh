#!/usr/bin/env bash
# Runs once per srun task, on its node: derives torchrun-style variables from Slurm's, then
# execs the program, so the trainer sees the same variables under either launcher.
#   usage: _task.sh gpu|torchrun|rollout MODULE [ARGS...]
#   gpu       one task per GPU: RANK, LOCAL_RANK, WORLD_SIZE from SLURM_PROCID, SLURM_LOCALID,
#             SLURM_NTASKS (srun's block distribution: node n holds ranks n*P .. n*P+P-1)
#   torchrun  one task per node: python -m torch.distributed.run, node rank = SLURM_PROCID
#   rollout   one task per rollout-TP group of a rollout node's GPUs (disaggregated): RANK/WORLD_SIZE
#             among the rollout servers, LOCAL_RANK on the node (it picks the server's GPUs)
# MASTER_ADDR, MASTER_PORT, UNIAPL_PYTHON and UNIAPL_PROCS_PER_NODE come from slurm/_launch.sh.
# With UNIAPL_DRY_RUN set it prints one line (the variables and the command) instead of running.
# Otherwise it runs the program and turns the launcher's SIGURG into SIGUSR1 for it (see below).
set -euo pipefail

mode="${1:?usage: _task.sh gpu|torchrun|rollout MODULE [ARGS...]}"
shift
py="${UNIAPL_PYTHON:-python3}"
p="$UNIAPL_PROCS_PER_NODE"
case "$mode" in
    gpu)
        export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
        export LOCAL_WORLD_SIZE="$p" UNIAPL_ROLE=train
        ranks="$RANK" world="$WORLD_SIZE" local_rank="$LOCAL_RANK"
        cmd=("$py" -m "$@") ;;
    torchrun)
        # torchrun sets RANK/LOCAL_RANK/WORLD_SIZE for each worker itself.
        unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
        export UNIAPL_ROLE=train
        ranks="$((SLURM_PROCID * p))-$((SLURM_PROCID * p + p - 1))" world=$((SLURM_NTASKS * p))
        local_rank="0-$((p - 1))"
        cmd=("$py" -m torch.distributed.run --nnodes="$SLURM_NTASKS" --node-rank="$SLURM_PROCID"
            --nproc-per-node="$p" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m "$@") ;;
    rollout)
        export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS" UNIAPL_ROLE=rollout
        ranks="$RANK" world="$WORLD_SIZE" local_rank="$LOCAL_RANK"
        cmd=("$py" -m "$@") ;;
    *)
        echo "_task.sh: unknown mode '$mode' (expected gpu, torchrun or rollout)" >&2
        exit 2 ;;
esac

if [ -n "${UNIAPL_DRY_RUN:-}" ]; then
    printf -v quoted '%q ' "${cmd[@]}"
    echo "task node=${SLURMD_NODENAME:-?} role=$UNIAPL_ROLE node_rank=${SLURM_NODEID:-?}" \
        "rank=$ranks local_rank=$local_rank world_size=$world master=$MASTER_ADDR:$MASTER_PORT" \
        "cmd=${quoted% }"
    exit 0
fi

# Run the program as a child, not exec: Slurm delivers a step's signals to every process in it,
# and helper processes (Megatron's checkpoint-writer Manager, data or vLLM workers) die on SIGUSR1.
# So the launcher sends SIGURG (ignored by default: harmless to them) and this wrapper turns it
# into SIGUSR1 for the program's main process only (a rollout task has nothing to save).
# Under torchrun the workers are torchrun's children; they are signalled directly, because torchrun
# itself would pass the signal on to each worker's whole process group, helpers included.
save_request() {
    local pid
    if [ "$UNIAPL_ROLE" != train ]; then return 0; fi
    if [ "$mode" = torchrun ]; then
        for pid in $(pgrep -P "$child"); do kill -USR1 "$pid" 2>/dev/null || true; done
    else
        kill -USR1 "$child" 2>/dev/null || true
    fi
}
"${cmd[@]}" &
child=$!
trap save_request URG
# SIGTERM (scancel, time limit) reaches the program from Slurm itself; keep waiting for its save.
trap ':' TERM
while :; do
    rc=0
    wait "$child" || rc=$?
    if ! kill -0 "$child" 2>/dev/null; then exit "$rc"; fi
done
