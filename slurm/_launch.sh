# shellcheck shell=bash
# The launch logic shared by slurm/uniapl_*.sh and slurm/generate_*.sh (they hold the #SBATCH
# headers and source this). UNIAPL_COMMAND (train, the default, or generate) is the `uniapl`
# subcommand every rank runs; for generate the layout check is `python -m uniapl_megatron.generate`
# (world = generate.data_parallel_size x teacher.tensor_parallel_size) instead of the memory planner.
#
# What it does inside an allocation:
#   1. reads placement from the config (tools/plan_memory.py --shell) and refuses, before anything
#      starts, a layout that does not divide the GPUs or fit their memory;
#   2. sets the environment Megatron, NCCL and PyTorch want (each variable says why below);
#   3. launches training with srun, one task per GPU (default), and in disaggregated mode a second
#      srun step on the last rollout.num_nodes nodes running one rollout server per rollout-TP group
#      of their GPUs (`uniapl rollout`, same config and overrides; each reaches trainer rank 0 at
#      $MASTER_ADDR:$MASTER_PORT+17);
#   4. passes the time-limit signal (#SBATCH --signal=B:USR1@N reaches only this shell) on to the
#      trainer, which saves a checkpoint and exits; then requeues the job, and the next run
#      resumes from <output_dir>/checkpoints/latest (resume=auto). It also requeues when the trainer
#      stopped itself for the same reason (train.job_end_time: <output_dir>/health/exit.json says
#      "deadline") or its hang watchdog fired (<output_dir>/health/hang_report.json, exit 75).
#
# Launchers (UNIAPL_LAUNCHER):
#   srun      one srun task per GPU (Megatron's way): each task gets RANK/LOCAL_RANK/WORLD_SIZE
#             from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS (slurm/_task.sh).
#   torchrun  one srun task per node running `python -m torch.distributed.run` with
#             --nproc-per-node GPUs; the time-limit request goes to torchrun's workers directly.
#
# Knobs (environment): UNIAPL_LAUNCHER, UNIAPL_PYTHON (default <repo>/.venv/bin/python, else
# python3), UNIAPL_MASTER_PORT, UNIAPL_GPU_MEM_GIB (default: nvidia-smi; unknown = no fit check),
# UNIAPL_PROCS_PER_NODE (default: the allocation's tasks per node), UNIAPL_REQUEUE_ON_SIGNAL (1),
# UNIAPL_REQUEUE_ON_HANG (1), UNIAPL_MAX_RESTARTS (20), UNIAPL_DRY_RUN=1 (print every node's
# command for the allocation in SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES,
# SLURM_NTASKS_PER_NODE; run nothing),
# UNIAPL_ROLLOUT_PYTHON (the rollout servers' Python, e.g. a venv of its own with vLLM; default
# UNIAPL_PYTHON), UNIAPL_CPU_BIND (auto: bind each training rank to its GPU's NUMA node; none),
# UNIAPL_GPU_NUMA_NODES (the NUMA node of GPU 0,1,...; default: nvidia-smi + sysfs), UNIAPL_NUMA_TOOL
# (numactl or taskset; default: numactl when installed).

UNIAPL_LOG_PREFIX="[uniapl-launch]"

uniapl_log() { echo "$UNIAPL_LOG_PREFIX $*" >&2; }
uniapl_die() { echo "$UNIAPL_LOG_PREFIX error: $*" >&2; exit 1; }

uniapl_usage() {
    cat >&2 <<EOF
usage: sbatch [sbatch options] $1 CONFIG.yaml [section.key=value ...]
       UNIAPL_DRY_RUN=1 SLURM_JOB_ID=1 SLURM_JOB_NODELIST='node[01-32]' SLURM_NNODES=32 \\
         SLURM_NTASKS_PER_NODE=8 bash $1 CONFIG.yaml [section.key=value ...]
The overrides go to \`uniapl ${UNIAPL_COMMAND:-train}\` unchanged. See slurm/_launch.sh for the environment knobs.
EOF
}

# Expand a Slurm hostlist without Slurm (dry runs): "gpu[001-003,007],r[1-2]n[1-2]" -> one name a
# line, zero padding kept. Real jobs ask scontrol.
uniapl_expand_hostlist() {
    local list="$1" item="" depth=0 ch i
    for ((i = 0; i <= ${#list}; i++)); do
        ch="${list:i:1}"
        if [ -z "$ch" ] || { [ "$ch" = , ] && [ "$depth" -eq 0 ]; }; then
            [ -n "$item" ] && uniapl_expand_host "$item"
            item=""
            continue
        fi
        case "$ch" in "[") depth=$((depth + 1)) ;; "]") depth=$((depth - 1)) ;; esac
        item+="$ch"
    done
}

# One hostlist item: expand its first [ranges] group, then the rest of the name recursively.
uniapl_expand_host() {
    local item="$1" prefix ranges rest range lo hi n
    if [[ "$item" != *"["* ]]; then printf '%s\n' "$item"; return 0; fi
    [[ "$item" =~ ^([^][]*)\[([0-9,-]+)\](.*)$ ]] || uniapl_die "bad hostlist item '$item'"
    prefix="${BASH_REMATCH[1]}" ranges="${BASH_REMATCH[2]}" rest="${BASH_REMATCH[3]}"
    local -a parts
    IFS=, read -r -a parts <<<"$ranges"
    for range in "${parts[@]}"; do
        lo="${range%-*}" hi="${range#*-}"
        for ((n = 10#$lo; n <= 10#$hi; n++)); do
            uniapl_expand_host "$(printf '%s%0*d' "$prefix" "${#lo}" "$n")$rest"
        done
    done
}

uniapl_hostnames() {
    if [ -n "${UNIAPL_DRY_RUN:-}" ]; then
        uniapl_expand_hostlist "$SLURM_JOB_NODELIST"
    else
        scontrol show hostnames "$SLURM_JOB_NODELIST"
    fi
}

# The environment Megatron, NCCL and PyTorch want; values already set by the user win.
uniapl_set_env() {
    # Megatron: one hardware queue per GPU keeps kernels in issue order, so the TP/SP communication
    # issued before a GEMM really overlaps with it (Megatron asserts this for sequence parallelism).
    # For the trainer only: _task.sh sets it in training tasks; rollout servers (vLLM overlaps its own
    # streams) and the engines a trainer spawns (rollout/vllm_host.py) do not get it.
    export UNIAPL_TRAIN_CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    unset CUDA_DEVICE_MAX_CONNECTIONS
    # CUDA numbers GPUs in PCI order, as nvidia-smi and Slurm do: the NUMA binding looks GPUs up by index.
    export CUDA_DEVICE_ORDER="${CUDA_DEVICE_ORDER:-PCI_BUS_ID}"
    # A dead rank or hung collective raises in every rank instead of blocking until the time limit,
    # so the job ends (and can be requeued) instead of burning 256 GPUs doing nothing.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    # Async collectives release their buffers without record_stream: lower peak memory.
    export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
    # NCCL's own warnings (and the failing operation on errors) appear in the job log.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # Each rank's thread pools sized to its own CPUs, not the whole node (8 ranks would oversubscribe).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    # HF tokenizers' thread pool warns and can deadlock after fork (data workers, vLLM workers).
    export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
    # 256 ranks' log lines reach the job log as they happen, not in 4 KiB bursts.
    export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
    # torchrun launcher: on SIGTERM (time limit, scancel) torchrun gives its workers this long to
    # save before SIGKILL (default 30 s).
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
    # Not set here on purpose: PYTORCH_CUDA_ALLOC_CONF=expandable_segments (vLLM's sleep mode
    # refuses it) and fabric-specific NCCL_SOCKET_IFNAME / NCCL_IB_HCA (they belong to the site).
}

# Shell-quoted command line, for logs and dry runs.
uniapl_quote() { local out; printf -v out '%q ' "$@"; printf '%s' "${out% }"; }

# Find <output_dir>/checkpoints/latest; print what it names, or "none".
uniapl_latest_checkpoint() {
    local latest="${UNIAPL_OUTPUT_DIR:+$UNIAPL_OUTPUT_DIR/checkpoints/latest}"
    if [ -n "$latest" ] && [ -s "$latest" ]; then head -c 200 "$latest" | head -1; else echo none; fi
}

# Read placement from the config and check the layout (and memory, when the GPU size is known).
uniapl_plan() {
    local gpu_gib="${UNIAPL_GPU_MEM_GIB:-}" assignments
    if [ -z "$gpu_gib" ] && command -v nvidia-smi >/dev/null 2>&1; then
        gpu_gib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null \
            | head -1 | awk '{ if ($1 > 0) printf "%.2f", $1 / 1024 }')"
    fi
    if [ "$UNIAPL_COMMAND" = generate ]; then
        assignments="$(PYTHONPATH="$UNIAPL_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$UNIAPL_PYTHON" -m uniapl_megatron.generate \
            "$UNIAPL_CONFIG" "${UNIAPL_OVERRIDES[@]}" --world $((UNIAPL_NNODES * UNIAPL_PROCS_PER_NODE)))" \
            || uniapl_die "the generate layout check refused this launch (above); nothing was started"
    else
        assignments="$("$UNIAPL_PYTHON" "$UNIAPL_ROOT/tools/plan_memory.py" "$UNIAPL_CONFIG" \
            "${UNIAPL_OVERRIDES[@]}" --nodes "$UNIAPL_NNODES" --gpus-per-node "$UNIAPL_PROCS_PER_NODE" \
            --gpu-mem-gib "${gpu_gib:-0}" --shell)" \
            || uniapl_die "the memory/layout plan refused this launch (above); nothing was started"
    fi
    # Only the UNIAPL_* assignments the planner prints (values are shlex-quoted).
    local line
    while IFS= read -r line; do
        case "$line" in
            UNIAPL_OUTPUT_DIR=* | UNIAPL_RESUME=* | UNIAPL_ROLLOUT_MODE=* | UNIAPL_ROLLOUT_NODES=* \
                | UNIAPL_ROLLOUT_TASKS_PER_NODE=*)
                eval "export $line" ;;
            *) uniapl_die "unexpected planner output: $line" ;;
        esac
    done <<<"$assignments"
}

# Build the srun command lines for the training and (disaggregated) rollout steps. The *_TASK
# arrays are what slurm/_task.sh receives on each node; the *_STEP arrays are the full srun lines.
uniapl_build_steps() {
    local -a common=(--kill-on-bad-exit=1 --label --distribution=block)
    local t="$UNIAPL_TRAIN_NODES" p="$UNIAPL_PROCS_PER_NODE" cpt="${SLURM_CPUS_PER_TASK:-}"
    local task="$UNIAPL_ROOT/slurm/_task.sh"
    if [ -n "${SLURM_GPUS_PER_NODE:-}" ] && [ "${SLURM_GPUS_PER_NODE}" != 0 ]; then
        common+=(--gpus-per-node="$SLURM_GPUS_PER_NODE")
    fi
    local -a where=() per_task=() node_cpus=()
    if [ "$UNIAPL_ROLLOUT_NODES" -gt 0 ]; then where=(--nodelist="$UNIAPL_TRAIN_HOSTS"); fi
    # srun does not pass the batch's --cpus-per-task on to steps (Slurm 22.05+): say it again.
    if [ -n "$cpt" ]; then per_task=(--cpus-per-task="$cpt"); node_cpus=(--cpus-per-task=$((cpt * p))); fi
    # Training ranks bind themselves to their GPU's NUMA node (_task.sh): Slurm's own binding stays out.
    if [ "${UNIAPL_CPU_BIND:-auto}" != none ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ] \
        && [ "${SLURM_GPUS_PER_NODE}" != 0 ]; then
        per_task+=(--cpu-bind=none)
    fi
    case "$UNIAPL_LAUNCHER" in
        srun)
            UNIAPL_TRAIN_TASK=(gpu uniapl_megatron.cli "$UNIAPL_COMMAND" "$UNIAPL_CONFIG" "${UNIAPL_OVERRIDES[@]}")
            UNIAPL_TRAIN_STEP=(srun "${common[@]}" --nodes="$t" --ntasks=$((t * p))
                --ntasks-per-node="$p" "${per_task[@]}" "${where[@]}" bash "$task" "${UNIAPL_TRAIN_TASK[@]}") ;;
        torchrun)
            UNIAPL_TRAIN_TASK=(torchrun uniapl_megatron.cli "$UNIAPL_COMMAND" "$UNIAPL_CONFIG" "${UNIAPL_OVERRIDES[@]}")
            UNIAPL_TRAIN_STEP=(srun "${common[@]}" --nodes="$t" --ntasks="$t" --ntasks-per-node=1
                "${node_cpus[@]}" "${where[@]}" bash "$task" "${UNIAPL_TRAIN_TASK[@]}") ;;
        *) uniapl_die "UNIAPL_LAUNCHER must be srun or torchrun, got '$UNIAPL_LAUNCHER'" ;;
    esac
    UNIAPL_ROLLOUT_TASK=(rollout uniapl_megatron.cli rollout "$UNIAPL_CONFIG" "${UNIAPL_OVERRIDES[@]}")
    UNIAPL_ROLLOUT_STEP=()
    if [ "$UNIAPL_ROLLOUT_NODES" -gt 0 ]; then
        # One rollout server (engine) per rollout-TP group of each rollout node's GPUs; each takes its
        # group of the node's GPUs (uniapl_megatron/rollout/placement.py server_devices).
        local r="${UNIAPL_ROLLOUT_TASKS_PER_NODE:-1}"
        local -a server_cpus=()
        if [ -n "$cpt" ]; then server_cpus=(--cpus-per-task=$((cpt * p / r))); fi
        UNIAPL_ROLLOUT_STEP=(srun "${common[@]}" --nodes="$UNIAPL_ROLLOUT_NODES"
            --ntasks=$((UNIAPL_ROLLOUT_NODES * r)) --ntasks-per-node="$r" "${server_cpus[@]}"
            --nodelist="$UNIAPL_ROLLOUT_HOSTS" bash "$task" "${UNIAPL_ROLLOUT_TASK[@]}")
    fi
}

# Dry run: play srun's block distribution and run _task.sh in print mode for every task.
uniapl_dry_run() {
    local t="$UNIAPL_TRAIN_NODES" n l per_node=1
    local task="$UNIAPL_ROOT/slurm/_task.sh"
    echo "step train: $(uniapl_quote "${UNIAPL_TRAIN_STEP[@]}")"
    if [ "${#UNIAPL_ROLLOUT_STEP[@]}" -gt 0 ]; then
        echo "step rollout: $(uniapl_quote "${UNIAPL_ROLLOUT_STEP[@]}")"
    fi
    if [ "$UNIAPL_LAUNCHER" = srun ]; then per_node="$UNIAPL_PROCS_PER_NODE"; fi
    for ((n = 0; n < t; n++)); do
        for ((l = 0; l < per_node; l++)); do
            SLURMD_NODENAME="${UNIAPL_HOSTS[n]}" SLURM_NODEID="$n" SLURM_LOCALID="$l" \
                SLURM_PROCID=$((n * per_node + l)) SLURM_NTASKS=$((t * per_node)) \
                bash "$task" "${UNIAPL_TRAIN_TASK[@]}"
        done
    done
    local r="${UNIAPL_ROLLOUT_TASKS_PER_NODE:-1}"
    for ((n = 0; n < UNIAPL_ROLLOUT_NODES; n++)); do
        for ((l = 0; l < r; l++)); do
            SLURMD_NODENAME="${UNIAPL_HOSTS[t + n]}" SLURM_NODEID="$n" SLURM_LOCALID="$l" \
                SLURM_PROCID=$((n * r + l)) SLURM_NTASKS=$((UNIAPL_ROLLOUT_NODES * r)) \
                bash "$task" "${UNIAPL_ROLLOUT_TASK[@]}"
        done
    done
}

UNIAPL_SIGNALED=""
UNIAPL_TRAIN_PID=""
UNIAPL_LAUNCH_TIME=""

# Why this run should be requeued, or nothing: the time-limit signal, the trainer's own stop before the
# job's end (health/exit.json reason "deadline"), or a hang report; files count only when this run
# (started at UNIAPL_LAUNCH_TIME, Unix seconds) wrote them.
uniapl_requeue_reason() {
    local health="${UNIAPL_OUTPUT_DIR:+$UNIAPL_OUTPUT_DIR/health}" since="${UNIAPL_LAUNCH_TIME:-0}"
    if [ "$UNIAPL_SIGNALED" = USR1 ] && [ "${UNIAPL_REQUEUE_ON_SIGNAL:-1}" = 1 ]; then
        echo "the time limit is near (SIGUSR1)"
    elif [ -n "$health" ] && [ "${UNIAPL_REQUEUE_ON_SIGNAL:-1}" = 1 ] && [ -f "$health/exit.json" ] \
        && [ "$(stat -c %Y "$health/exit.json")" -ge "$since" ] \
        && grep -q '"reason": "deadline"' "$health/exit.json"; then
        echo "the trainer saved and stopped before the job's end time"
    elif [ -n "$health" ] && [ "${UNIAPL_REQUEUE_ON_HANG:-1}" = 1 ] && [ -f "$health/hang_report.json" ] \
        && [ "$(stat -c %Y "$health/hang_report.json")" -ge "$since" ]; then
        echo "the trainer hung: $health/hang_report.json names the ranks that did not arrive"
    fi
}

# USR1 comes from #SBATCH --signal=B:USR1@N before the time limit: ask the trainer to save and exit.
# Not by signalling the steps with USR1: Slurm delivers a step's signals to every process in it, and
# helper processes (Megatron's checkpoint-writer Manager, spawned workers) die of USR1, which breaks
# the very save it asks for. SIGURG is ignored by default; slurm/_task.sh turns it into SIGUSR1 for
# the trainer's main process only. (SIGTERM to srun would not do either: srun kills the step.)
uniapl_on_usr1() {
    UNIAPL_SIGNALED=USR1
    uniapl_log "got SIGUSR1 (time limit near): asking the trainer to save and stop (SIGURG to the steps)"
    if [ -n "$UNIAPL_TRAIN_PID" ]; then
        scancel --signal=URG "$SLURM_JOB_ID" || uniapl_log "scancel --signal=URG failed"
    fi
}

# SIGTERM (scancel, preemption, time limit): Slurm signals the steps itself; keep waiting so the
# trainer's save can finish within KillWait.
uniapl_on_term() { uniapl_log "got SIGTERM: waiting for the steps to stop"; }

uniapl_run() {
    local rollout_pid="" rc=0 rollout_died=""
    if [ -n "$UNIAPL_SIGNALED" ]; then
        uniapl_log "signalled before the launch: not starting the steps"
    else
        if [ "${#UNIAPL_ROLLOUT_STEP[@]}" -gt 0 ]; then
            uniapl_log "rollout step: $(uniapl_quote "${UNIAPL_ROLLOUT_STEP[@]}")"
            "${UNIAPL_ROLLOUT_STEP[@]}" &
            rollout_pid=$!
        fi
        uniapl_log "train step: $(uniapl_quote "${UNIAPL_TRAIN_STEP[@]}")"
        UNIAPL_LAUNCH_TIME="$(date +%s)"
        "${UNIAPL_TRAIN_STEP[@]}" &
        UNIAPL_TRAIN_PID=$!
        # Poll both steps: if the rollout step dies the trainer would wait for rollouts forever.
        # A trapped signal (USR1) ends the short wait at once, so forwarding is not delayed.
        while kill -0 "$UNIAPL_TRAIN_PID" 2>/dev/null; do
            if [ -n "$rollout_pid" ] && ! kill -0 "$rollout_pid" 2>/dev/null; then
                rc=0
                wait "$rollout_pid" || rc=$?
                uniapl_log "rollout step ended (status $rc) before training: asking the trainer" \
                    "to save and stop"
                scancel --signal=URG "$SLURM_JOB_ID" || true
                rollout_pid="" rollout_died=1
            fi
            sleep 2 &
            wait $! || true  # a trapped signal ends this wait at once
        done
        rc=0
        wait "$UNIAPL_TRAIN_PID" || rc=$?
        uniapl_log "train step ended with status $rc"
        if [ -n "$rollout_pid" ]; then
            kill -TERM "$rollout_pid" 2>/dev/null || true  # srun ends the step
            wait "$rollout_pid" || true
        fi
    fi
    local restarts="${SLURM_RESTART_COUNT:-0}" why
    why="$(uniapl_requeue_reason)"
    if [ -n "$why" ]; then
        if [ "$restarts" -lt "${UNIAPL_MAX_RESTARTS:-20}" ]; then
            uniapl_log "$why: requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from" \
                "the checkpoint: $(uniapl_latest_checkpoint)"
            # Slurm ends this run as it requeues the job (SIGTERM here and to scontrol itself).
            scontrol requeue "$SLURM_JOB_ID" || true
        else
            uniapl_log "not requeueing: $restarts restarts reached UNIAPL_MAX_RESTARTS"
        fi
    fi
    if [ -n "$rollout_died" ] && [ "$rc" -eq 0 ]; then rc=1; fi
    return "$rc"
}

uniapl_main() {
    local script="$1"
    shift
    UNIAPL_COMMAND="${UNIAPL_COMMAND:-train}"
    case "$UNIAPL_COMMAND" in train | generate) ;; *) uniapl_die "UNIAPL_COMMAND must be train or generate" ;; esac
    trap uniapl_on_usr1 USR1
    trap uniapl_on_term TERM
    if [ "$#" -eq 0 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
        uniapl_usage "$script"
        return 2
    fi
    [ -f "$1" ] || uniapl_die "config '$1' not found (working directory $PWD)"
    UNIAPL_CONFIG="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
    shift
    UNIAPL_OVERRIDES=("$@")
    local o
    for o in "${UNIAPL_OVERRIDES[@]}"; do
        [[ "$o" == ?*=* ]] || uniapl_die "override '$o' is not key=value"
    done

    if [ -z "${SLURM_JOB_ID:-}" ]; then
        uniapl_usage "$script"
        uniapl_die "not inside a Slurm job: submit with sbatch, or dry-run with a fake allocation"
    fi
    local v
    for v in SLURM_JOB_NODELIST SLURM_NNODES; do
        [ -n "${!v:-}" ] || uniapl_die "$v is not set (needed to place the ranks)"
    done
    UNIAPL_NNODES="$SLURM_NNODES"
    # Tasks per node = GPUs per node (one rank each); SLURM_TASKS_PER_NODE looks like "8(x32)".
    UNIAPL_PROCS_PER_NODE="${UNIAPL_PROCS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}}"
    [[ "$UNIAPL_PROCS_PER_NODE" =~ ^[1-9][0-9]*$ ]] \
        || uniapl_die "tasks per node unknown: set SLURM_NTASKS_PER_NODE (sbatch --ntasks-per-node)"
    UNIAPL_LAUNCHER="${UNIAPL_LAUNCHER:-srun}"
    if [ -z "${UNIAPL_PYTHON:-}" ]; then
        if [ -x "$UNIAPL_ROOT/.venv/bin/python" ]; then UNIAPL_PYTHON="$UNIAPL_ROOT/.venv/bin/python"
        else UNIAPL_PYTHON="$(command -v python3)"; fi
    fi
    export UNIAPL_PYTHON UNIAPL_PROCS_PER_NODE UNIAPL_LAUNCHER

    uniapl_plan
    mapfile -t UNIAPL_HOSTS < <(uniapl_hostnames)
    [ "${#UNIAPL_HOSTS[@]}" -eq "$UNIAPL_NNODES" ] \
        || uniapl_die "SLURM_JOB_NODELIST has ${#UNIAPL_HOSTS[@]} hosts but SLURM_NNODES=$UNIAPL_NNODES"
    UNIAPL_TRAIN_NODES=$((UNIAPL_NNODES - UNIAPL_ROLLOUT_NODES))
    local IFS=,
    export UNIAPL_TRAIN_HOSTS="${UNIAPL_HOSTS[*]:0:UNIAPL_TRAIN_NODES}"
    export UNIAPL_ROLLOUT_HOSTS="${UNIAPL_HOSTS[*]:UNIAPL_TRAIN_NODES}"
    unset IFS
    # Training ranks come first, so the job's first node is both the master and a training node.
    export MASTER_ADDR="${UNIAPL_HOSTS[0]}"
    export MASTER_PORT="${UNIAPL_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    uniapl_set_env
    uniapl_build_steps

    uniapl_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $UNIAPL_NNODES nodes x" \
        "$UNIAPL_PROCS_PER_NODE, launcher $UNIAPL_LAUNCHER, placement $UNIAPL_ROLLOUT_MODE" \
        "($UNIAPL_TRAIN_NODES train, $UNIAPL_ROLLOUT_NODES rollout nodes)," \
        "train world size $((UNIAPL_TRAIN_NODES * UNIAPL_PROCS_PER_NODE)), master $MASTER_ADDR:$MASTER_PORT"
    uniapl_log "config $UNIAPL_CONFIG, resume=$UNIAPL_RESUME, output_dir=${UNIAPL_OUTPUT_DIR:-?}," \
        "latest checkpoint: $(uniapl_latest_checkpoint)"
    if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && [ "$UNIAPL_RESUME" != auto ]; then
        uniapl_log "warning: requeued run with resume=$UNIAPL_RESUME (not auto) may start over"
    fi
    if [ -n "${UNIAPL_DRY_RUN:-}" ]; then
        uniapl_dry_run
        return 0
    fi
    uniapl_run
}
