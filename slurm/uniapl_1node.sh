#!/usr/bin/env bash
# UniAPL training on 1 node x 8 GPUs (8 ranks, one srun task per GPU): the 32-node script's logic
# (slurm/_launch.sh) on one node, for recipes and debugging before going wide.
#
#   sbatch [-p PARTITION] [-A ACCOUNT] [--time=...] slurm/uniapl_1node.sh \
#       CONFIG.yaml [key=value ...]
#
# Submit from the repository root (relative config and output paths are resolved there). The
# log is <job-name>-<job id>.out in that folder; a requeued job appends to the same file.
# Placement (colocated / disaggregated rollout), environment, the time-limit checkpoint and
# resume are in slurm/_launch.sh; `UNIAPL_DRY_RUN=1 ... bash slurm/uniapl_1node.sh` prints
# every node's command for a fake allocation without running anything (see its header).
#
# 300 s before the time limit the batch shell gets SIGUSR1 (B: = the batch shell only), forwards
# it to the trainer, which saves a checkpoint and exits; the job then requeues itself and
# resumes from <output_dir>/checkpoints/latest. --requeue also requeues after a node failure.
#SBATCH --job-name=uniapl-1n
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# Under sbatch this file runs from a copy in Slurm's spool folder: find the repository through
# $UNIAPL_ROOT, the path that was submitted, the submit folder, or (dry runs) this file's path.
uniapl_find_root() {
    local cand submitted=""
    if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${UNIAPL_DRY_RUN:-}" ]; then
        submitted="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')"
    fi
    for cand in "${UNIAPL_ROOT:-}" "${submitted:+$(dirname "$submitted")/..}" \
        "${SLURM_SUBMIT_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/.."; do
        if [ -n "$cand" ] && [ -f "$cand/slurm/_launch.sh" ]; then (cd "$cand" && pwd); return 0; fi
    done
    echo "[uniapl-launch] error: cannot find the repository (slurm/_launch.sh); set UNIAPL_ROOT" >&2
    return 1
}
UNIAPL_ROOT="$(uniapl_find_root)"
export UNIAPL_ROOT
# shellcheck source=slurm/_launch.sh
source "$UNIAPL_ROOT/slurm/_launch.sh"
uniapl_main slurm/uniapl_1node.sh "$@"
