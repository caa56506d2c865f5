#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, to run the ladder's Slurm path against (make test-slurm).
#
#   tools/slurm_cluster.sh up       install munge and Slurm from the Debian packages if missing, write a
#                                   one-node configuration in $SLURM_DIR, start munged, slurmctld, slurmd
#   tools/slurm_cluster.sh status   daemons, node and queue
#   tools/slurm_cluster.sh down     stop the daemons `up` started (by their pid files), remove $SLURM_DIR
#
# Needs: Debian or Ubuntu, root (it installs packages and runs the daemons), apt-get with the distribution's
# repositories reachable the first time. No systemd: the daemons are started directly. No cgroups
# (proctrack/linuxproc, task/none) and no accounting database: the ladder reads job states with squeue.
# Clients (sbatch, squeue, scancel, and ssmscale through submitit) need SLURM_CONF=$SLURM_DIR/slurm.conf.
set -euo pipefail

SLURM_DIR=${SLURM_DIR:-/tmp/ssmscale-slurm}
CONF=$SLURM_DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

install_packages() {
    local missing=()
    for bin in munged slurmctld slurmd sbatch; do command -v "$bin" >/dev/null || missing+=("$bin"); done
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || die "apt-get not found: install munge and Slurm (slurmctld, slurmd, slurm-client) yourself"
    echo "installing munge and Slurm from the Debian packages (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        munge slurmctld slurmd slurm-client >/dev/null
}

write_config() {
    mkdir -p "$SLURM_DIR"/{state,spool,munge,log}
    # the node as slurmd itself measures it (CPUs, sockets, cores, memory), so it registers as healthy
    local node cpus mem
    node=$(slurmd -C | head -n 1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    cat >"$CONF" <<EOF
# written by tools/slurm_cluster.sh: one node, no cgroups, no accounting database
ClusterName=ssmscale
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SLURM_DIR/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job that asks for no memory gets its CPUs' share (the default, all of it, would run one job at a time)
DefMemPerCPU=$((mem / cpus))
ReturnToService=2
# a cancelled job is killed 10 s after its SIGTERM (default 30 s), to keep the test short
KillWait=10
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key missing (the munge package creates it)"
    chown munge:munge "$SLURM_DIR/munge"
    chmod 755 "$SLURM_DIR/munge"     # munged: the socket's folder must be searchable by all
    runuser -u munge -- munged --socket="$SLURM_DIR/munge/munge.socket" \
        --pid-file="$SLURM_DIR/munge/munged.pid" --log-file="$SLURM_DIR/munge/munged.log" \
        --seed-file="$SLURM_DIR/munge/munged.seed"
}

wait_for() {   # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
    die "$what did not come up in ${limit} s (logs in $SLURM_DIR/log)"
}

node_idle() { sinfo -h -o %t | grep -qx idle; }

up() {
    [ "$(id -u)" -eq 0 ] || die "needs root (packages and daemons)"
    if [ -f "$SLURM_DIR/slurmctld.pid" ] && kill -0 "$(cat "$SLURM_DIR/slurmctld.pid")" 2>/dev/null; then
        echo "already up: export SLURM_CONF=$CONF"; return
    fi
    install_packages
    write_config
    start_munge
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    wait_for 30 "slurmctld" scontrol ping
    wait_for 60 "the node" node_idle
    echo "Slurm is up ($(sinfo -h -o '%n: %c CPUs, %m MB')); clients need: export SLURM_CONF=$CONF"
}

stop_pidfile() {
    local file=$1
    [ -f "$file" ] || return 0
    local pid
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
}

down() {
    [ -d "$SLURM_DIR" ] || { echo "not up"; return; }
    if [ -f "$SLURM_DIR/slurmctld.pid" ]; then scancel --full --quiet --user="$(id -un)" 2>/dev/null || true; fi
    stop_pidfile "$SLURM_DIR/slurmd.pid"
    stop_pidfile "$SLURM_DIR/slurmctld.pid"
    stop_pidfile "$SLURM_DIR/munge/munged.pid"
    rm -rf "$SLURM_DIR"
    echo "Slurm is down"
}

status() {
    [ -f "$CONF" ] || { echo "not up"; return 1; }
    for d in slurmctld slurmd munge/munged; do
        local pidfile=$SLURM_DIR/$d.pid state=stopped
        [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && state="running (pid $(cat "$pidfile"))"
        echo "$(basename $d): $state"
    done
    sinfo
    squeue
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status   (SLURM_DIR=$SLURM_DIR)" >&2; exit 2 ;;
esac
