#!/usr/bin/env bash
# Teacher demonstrations (`uniapl generate`) on 4 nodes x 8 GPUs: one vLLM engine per
# teacher.tensor_parallel_size GPUs (e.g. TP=8: one engine per node, generate.data_parallel_size=4).
# The same launcher as training (slurm/_launch.sh, UNIAPL_COMMAND=generate): one srun task per GPU,
# the layout checked before anything starts (world = DP x TP), the time-limit signal and requeue.
#
#   sbatch [-p PARTITION] [-A ACCOUNT] [--nodes=N] [--time=...] slurm/generate_teacher.sh \
#       examples/generate_teacher.yaml [section.key=value ...]
#
# Submit from the repository root. 300 s before the time limit each rank finishes its current chunk
# and stops; the job requeues itself and the next run skips the chunks already written (every
# chunk file is complete or absent), so no row is lost or written twice. When all chunks are
# there, rank 0 merges them into generate.output_path (+ .summary.json, .dropped.jsonl).
# `UNIAPL_DRY_RUN=1 ... bash slurm/generate_teacher.sh CONFIG` prints every rank's command instead.
#SBATCH --job-name=uniapl-generate
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=12:00:00
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
export UNIAPL_COMMAND=generate
# shellcheck source=slurm/_launch.sh
source "$UNIAPL_ROOT/slurm/_launch.sh"
uniapl_main slurm/generate_teacher.sh "$@"
