#!/usr/bin/env bash
# Stop the one-node cluster that .ci/slurm_up.sh started: slurmctld, slurmd, and munged if
# slurm_up.sh was the one that started it. Safe to call when nothing is running.
# The scratch folder ($UNIAPL_SLURM_DIR) is kept: its logs help when a test failed.
set -euo pipefail

DIR="${UNIAPL_SLURM_DIR:-/tmp/uniapl-slurm}"
export SLURM_CONF="$DIR/slurm.conf"

log() { echo "[slurm_down] $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

# Wait up to ~10 s for the process in pid file $1 to exit, then SIGKILL it.
stop_pidfile() {
    local pidfile="$1" pid
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    log "pid $pid ($pidfile) ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

if [ -f "$SLURM_CONF" ] && command -v scontrol >/dev/null 2>&1; then
    # Stops slurmctld and every registered slurmd.
    scontrol shutdown >/dev/null 2>&1 || true
fi
stop_pidfile "$DIR/slurmd.pid"
stop_pidfile "$DIR/slurmctld.pid"

if [ -f "$DIR/munged.started-by-us" ]; then
    if [ -s /run/munge/munged.pid ]; then
        as_root kill -TERM "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    rm -f "$DIR/munged.started-by-us"
fi
log "cluster down"
