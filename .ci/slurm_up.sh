#!/usr/bin/env bash
# Start a real one-node Slurm cluster on loopback (Debian's slurmctld + slurmd + munge), for the
# tests marked `slurm`. Idempotent: a second call finds the cluster up and only prints the export.
#
#   eval "$(.ci/slurm_up.sh)"      # stdout is exactly one line: export SLURM_CONF=...
#   .ci/slurm_down.sh              # stops what this script started
#
# Everything the cluster writes (config, state, spool, logs, pid files) lives in one scratch folder,
# $UNIAPL_SLURM_DIR (default /tmp/uniapl-slurm). No systemd and no cgroups are needed: processes are
# tracked by /proc (proctrack/linuxproc) and tasks are not confined (task/none).
# Tested as root on Debian 12 (Slurm 22.05, munge 0.5.15). As another user it needs passwordless
# sudo for apt-get and munged, and runs slurmctld/slurmd as that user (jobs of that user only).
set -euo pipefail

DIR="${UNIAPL_SLURM_DIR:-/tmp/uniapl-slurm}"
CONF="$DIR/slurm.conf"
CTLD_PORT="${UNIAPL_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${UNIAPL_SLURMD_PORT:-6818}"

log() { echo "[slurm_up] $*" >&2; }
die() { echo "[slurm_up] error: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else die "need root or passwordless sudo to run: $*"
    fi
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || [ -x /usr/sbin/slurmd ] || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
    command -v munge >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || missing+=(munge)
    if [ "${#missing[@]}" -eq 0 ]; then return 0; fi
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} with apt-get (log: $DIR/apt.log)"
    if ! { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurmctld slurmd slurm-client munge; } >"$DIR/apt.log" 2>&1; then
        tail -20 "$DIR/apt.log" >&2
        die "apt-get could not install slurmctld slurmd slurm-client munge"
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    [ -s /etc/munge/munge.key ] || as_root mungekey --create --keyfile=/etc/munge/munge.key >&2 \
        || die "no /etc/munge/munge.key and mungekey could not create one"
    as_root install -d -o munge -g munge -m 0755 /run/munge
    log "starting munged"
    as_root /usr/sbin/runuser -u munge -- /usr/sbin/munged >&2 || die "munged did not start"
    # Remember that we started it, so slurm_down.sh stops it (and only then).
    touch "$DIR/munged.started-by-us"
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "munge does not answer (munge -n | unmunge failed)"
}

write_conf() {
    local node cpus mem_mb user
    node="$(hostname -s)"
    cpus="$(nproc)"
    # ~90% of memory: slurmd refuses to register a node that claims more than it has.
    mem_mb="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    user="$(id -un)"
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF.tmp" <<EOF
# Written by .ci/slurm_up.sh: a one-node cluster on loopback for tests.
ClusterName=uniapl-ci
SlurmctldHost=${node}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=${user}
SlurmdUser=${user}
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/slurmctld.log
SlurmdLogFile=${DIR}/slurmd.log
# No systemd/cgroups here: track processes through /proc and do not confine tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, one job takes all of the node's memory and a second one waits.
DefMemPerCPU=1024
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to scontrol for 10 minutes (tests requeue them after they end).
MinJobAge=600
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv -f "$CONF.tmp" "$CONF"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }

wait_idle() {
    local state=""
    for _ in $(seq 150); do
        state="$(node_state)"
        case "$state" in
            idle|mixed|allocated|completing) return 0 ;;
            down*|drain*)
                scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    die "node did not become idle (state '${state}'); see $DIR/slurmctld.log and $DIR/slurmd.log"
}

main() {
    mkdir -p "$DIR"
    install_packages
    export SLURM_CONF="$CONF"
    start_munge
    if pid_alive "$DIR/slurmctld.pid" && scontrol ping 2>/dev/null | grep -q 'is UP'; then
        log "slurmctld already up"
    else
        write_conf
        log "starting slurmctld (config $CONF)"
        slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/slurmctld.log"
    fi
    if ! pid_alive "$DIR/slurmd.pid"; then
        log "starting slurmd"
        slurmd -f "$CONF" || die "slurmd did not start; see $DIR/slurmd.log"
    fi
    wait_idle
    log "cluster up: node $(hostname -s) is $(node_state)"
    echo "export SLURM_CONF=$CONF"
}

main "$@"
