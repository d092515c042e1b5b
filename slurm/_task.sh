#!/usr/bin/env bash
# Runs once per srun task, on its node: derives torchrun-style variables from Slurm's, then
# execs the program, so the trainer sees the same variables under either launcher.
#   usage: _task.sh gpu|torchrun|rollout MODULE [ARGS...]
#   gpu       one task per GPU: RANK, LOCAL_RANK, WORLD_SIZE from SLURM_PROCID, SLURM_LOCALID,
#             SLURM_NTASKS (srun's block distribution: node n holds ranks n*P .. n*P+P-1)
#   torchrun  one task per node: python -m torch.distributed.run, node rank = SLURM_PROCID
#   rollout   one task per rollout node (disaggregated): RANK/WORLD_SIZE among the rollout nodes
# MASTER_ADDR, MASTER_PORT, UNIAPL_PYTHON and UNIAPL_PROCS_PER_NODE come from slurm/_launch.sh.
# Training tasks get CUDA_DEVICE_MAX_CONNECTIONS (rollout tasks do not) and, one task per GPU, run bound
# to the CPUs and memory of their GPU's NUMA node (UNIAPL_CPU_BIND=none turns that off).
# With UNIAPL_DRY_RUN set it prints one line (the variables and the command) instead of running.
# Otherwise it runs the program and turns the launcher's SIGURG into SIGUSR1 for it (see below).
set -euo pipefail

mode="${1:?usage: _task.sh gpu|torchrun|rollout MODULE [ARGS...]}"
shift
py="${UNIAPL_PYTHON:-python3}"
p="$UNIAPL_PROCS_PER_NODE"

# The GPU index (nvidia-smi's numbering, or a UUID) of local rank $1: its entry in CUDA_VISIBLE_DEVICES.
gpu_of_local_rank() {
    local -a ids
    if [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then echo "$1"; return 0; fi
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${ids[$1]:-}"
}

# The NUMA node of GPU $1: UNIAPL_GPU_NUMA_NODES ("0,0,0,0,1,1,1,1", by index), else nvidia-smi's PCI
# bus id looked up in sysfs. Prints nothing when unknown (no GPU, no NUMA: sysfs says -1).
gpu_numa_node() {
    local gpu="$1" bus node root="${UNIAPL_SYSFS_ROOT:-/sys}"
    local -a nodes
    if [ -n "${UNIAPL_GPU_NUMA_NODES:-}" ]; then
        IFS=, read -r -a nodes <<<"$UNIAPL_GPU_NUMA_NODES"
        [[ "$gpu" =~ ^[0-9]+$ ]] && echo "${nodes[$gpu]:-}"
        return 0
    fi
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    bus="$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i "$gpu" 2>/dev/null | head -1)" || return 0
    bus="${bus,,}"
    # nvidia-smi writes an 8-digit PCI domain (00000000:18:00.0), sysfs a 4-digit one (0000:18:00.0).
    if [[ "$bus" =~ ^[0-9a-f]{8}: ]]; then bus="${bus:4}"; fi
    node="$(cat "$root/bus/pci/devices/$bus/numa_node" 2>/dev/null)" || return 0
    if [[ "$node" =~ ^[0-9]+$ ]]; then echo "$node"; fi
}

# Fill the array `bind` with the command prefix that binds this task to its GPU's NUMA node, and
# `bind_desc` with what it did (for the dry-run line and the log).
numa_bind() {
    local gpu node tool="${UNIAPL_NUMA_TOOL:-}" cpus
    bind=() bind_desc=none
    if [ "${UNIAPL_CPU_BIND:-auto}" = none ]; then bind_desc="none(UNIAPL_CPU_BIND=none)"; return 0; fi
    gpu="$(gpu_of_local_rank "$1")"
    node="$(gpu_numa_node "$gpu")"
    if [ -z "$node" ]; then bind_desc="none(NUMA node of GPU ${gpu:-?} unknown)"; return 0; fi
    if [ -z "$tool" ]; then
        if command -v numactl >/dev/null 2>&1; then tool=numactl; else tool=taskset; fi
    fi
    case "$tool" in
        # Memory: preferred, not bound: a full node spills over instead of failing allocations.
        numactl) bind=(numactl --cpunodebind="$node" --preferred="$node") ;;
        taskset)
            cpus="$(cat "${UNIAPL_SYSFS_ROOT:-/sys}/devices/system/node/node$node/cpulist" 2>/dev/null)" || cpus=""
            if [ -z "$cpus" ]; then bind_desc="none(no cpulist for NUMA node $node)"; return 0; fi
            bind=(taskset -c "$cpus") ;;
        *) echo "_task.sh: UNIAPL_NUMA_TOOL must be numactl or taskset, got '$tool'" >&2; exit 2 ;;
    esac
    bind_desc="numa:$node(gpu $gpu)"
}

case "$mode" in
    gpu)
        export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
        export LOCAL_WORLD_SIZE="$p" UNIAPL_ROLE=train
        export CUDA_DEVICE_MAX_CONNECTIONS="${UNIAPL_TRAIN_CUDA_DEVICE_MAX_CONNECTIONS:-1}"
        ranks="$RANK" world="$WORLD_SIZE" local_rank="$LOCAL_RANK"
        numa_bind "$LOCAL_RANK"
        cmd=("${bind[@]}" "$py" -m "$@") ;;
    torchrun)
        # torchrun sets RANK/LOCAL_RANK/WORLD_SIZE for each worker itself. Its workers are its own
        # children, so this wrapper cannot bind them one by one: no NUMA binding here.
        unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
        export UNIAPL_ROLE=train
        export CUDA_DEVICE_MAX_CONNECTIONS="${UNIAPL_TRAIN_CUDA_DEVICE_MAX_CONNECTIONS:-1}"
        ranks="$((SLURM_PROCID * p))-$((SLURM_PROCID * p + p - 1))" world=$((SLURM_NTASKS * p))
        local_rank="0-$((p - 1))" bind_desc="none(torchrun launcher)"
        cmd=("$py" -m torch.distributed.run --nnodes="$SLURM_NTASKS" --node-rank="$SLURM_PROCID"
            --nproc-per-node="$p" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m "$@") ;;
    rollout)
        export RANK="$SLURM_PROCID" LOCAL_RANK=0 WORLD_SIZE="$SLURM_NTASKS" UNIAPL_ROLE=rollout
        unset CUDA_DEVICE_MAX_CONNECTIONS
        ranks="$RANK" world="$WORLD_SIZE" local_rank=0 bind_desc="none(rollout server: all GPUs of the node)"
        cmd=("${UNIAPL_ROLLOUT_PYTHON:-$py}" -m "$@") ;;
    *)
        echo "_task.sh: unknown mode '$mode' (expected gpu, torchrun or rollout)" >&2
        exit 2 ;;
esac

if [ -n "${UNIAPL_DRY_RUN:-}" ]; then
    printf -v quoted '%q ' "${cmd[@]}"
    echo "task node=${SLURMD_NODENAME:-?} role=$UNIAPL_ROLE node_rank=${SLURM_NODEID:-?}" \
        "rank=$ranks local_rank=$local_rank world_size=$world master=$MASTER_ADDR:$MASTER_PORT" \
        "bind=${bind_desc// /_} cuda_max_connections=${CUDA_DEVICE_MAX_CONNECTIONS:--}" \
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
