#!/usr/bin/env bash
# Stop the cluster scripts/ci/slurm-up.sh started, by the process ids it recorded (and only those).
# Idempotent: nothing recorded means nothing to stop.
set -euo pipefail

dir="${FORGEPIPE_SLURM_DIR:-/tmp/forgepipe-slurm}"
pids="$dir/pids"

if [[ ! -s "$pids" ]]; then
    echo "slurm-down: nothing to stop (no $pids)"
    exit 0
fi

# Stop in reverse start order (slurmd, slurmctld, munged), waiting for each.
tac "$pids" | while read -r name pid; do
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
        echo "slurm-down: stopped $name ($pid)"
    fi
done
rm -f "$pids"
