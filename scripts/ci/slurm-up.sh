#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (munged, slurmctld, slurmd as root) for CI and the
# launch-path test. Installs Debian's slurm-wlm and munge when missing. Idempotent: a cluster this
# script already started is left as it is. Stop it with scripts/ci/slurm-down.sh.
#
# Settings (environment): FORGEPIPE_SLURM_DIR (state, logs, pid file; default /tmp/forgepipe-slurm),
# FORGEPIPE_SLURM_CPUS (CPUs of the node; default nproc), SLURM_CONF (default /etc/slurm/slurm.conf).
set -euo pipefail

dir="${FORGEPIPE_SLURM_DIR:-/tmp/forgepipe-slurm}"
conf="${SLURM_CONF:-/etc/slurm/slurm.conf}"
cpus="${FORGEPIPE_SLURM_CPUS:-$(nproc)}"
pids="$dir/pids"

say() { echo "slurm-up: $*"; }
die() { echo "slurm-up: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (the daemons run as root on this one-node test cluster)"

alive() {  # all pids recorded in the pid file are running
    [[ -s "$pids" ]] || return 1
    local pid
    while read -r _ pid; do kill -0 "$pid" 2>/dev/null || return 1; done < "$pids"
}

node_idle() { sinfo -h -N -n localhost -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

if alive && node_idle; then
    say "already running ($(tr '\n' ' ' < "$pids"))"
    exit 0
fi
if [[ -s "$pids" ]]; then
    say "stale or partial cluster found; stopping it first"
    "$(dirname "${BASH_SOURCE[0]}")/slurm-down.sh"
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge
fi

mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$(dirname "$conf")"
: > "$pids"

# munge: a key if there is none, then the daemon in the foreground (so its pid is the one we keep).
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R root:root /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
setsid munged --foreground --force >"$dir/log/munged.out" 2>&1 < /dev/null &
echo "munged $!" >> "$pids"
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || die "munged did not start; see $dir/log/munged.out"

cat > "$conf" <<CONF
# Written by forgepipe scripts/ci/slurm-up.sh: a one-node test cluster on localhost.
ClusterName=forgepipe-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$conf"
setsid slurmctld -D -i >"$dir/log/slurmctld.out" 2>&1 < /dev/null &
echo "slurmctld $!" >> "$pids"
setsid slurmd -D -N localhost >"$dir/log/slurmd.out" 2>&1 < /dev/null &
echo "slurmd $!" >> "$pids"

for _ in $(seq 60); do
    if node_idle; then
        say "up: $(sinfo -h -o '%P %a %D %T' | head -1) (pids in $pids)"
        exit 0
    fi
    alive || break
    sleep 1
done
die "the node did not become idle; logs in $dir/log (stop with scripts/ci/slurm-down.sh)"
