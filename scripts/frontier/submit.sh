#!/usr/bin/env bash
# Submit a forgepipe stage to Slurm after checking every setting, or show what would run.
#
#   scripts/frontier/submit.sh STAGE [--dry-run] [forgepipe options...]
#
# STAGE: sft | reward | ppo | pipeline. Settings come from the environment: ACCOUNT, NODES (1),
# WALLTIME (02:00:00), PARTITION, QOS, IMAGE, MODEL, DATA, OUTPUT_DIR, ... (see launch.sh and
# README.md); SBATCH_ARGS adds sbatch options (e.g. "--wait"); LOG_DIR holds the job logs.
# --dry-run prints the sbatch and srun lines and the resolved forgepipe config without submitting.
set -euo pipefail

usage() { sed -n '2,10s/^# \{0,1\}//p' "$0"; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
stage="$1"
shift
dry_run=0
args=()
for arg in "$@"; do
    if [[ "$arg" == --dry-run ]]; then dry_run=1; else args+=("$arg"); fi
done

FORGEPIPE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export FORGEPIPE_ROOT
# shellcheck source=scripts/frontier/launch.sh
. "$FORGEPIPE_ROOT/scripts/frontier/launch.sh"

fp_check "$stage" submit
fp_check_policy
fp_forgepipe_args "$stage" "${args[@]}"
fp_srun_cmd "$stage"

fp_sbatch_cmd "$stage"
sbatch_cmd=("${FP_SBATCH[@]}" "$FORGEPIPE_ROOT/scripts/frontier/$stage.sbatch" "${args[@]}")

if [[ "$dry_run" == 0 ]]; then
    mkdir -p "$LOG_DIR"
    exec "${sbatch_cmd[@]}"
fi

[[ -z "$FP_POLICY" ]] || echo "# policy: $FP_POLICY"
echo "# submit:"
fp_print_cmd "${sbatch_cmd[@]}"
echo "# run in the job:"
fp_print_cmd "${FP_SRUN[@]}"
if [[ "$FORGEPIPE_LAUNCHER" == apptainer ]]; then
    echo "# paths the run reads and writes, from $FP_PATHS_FROM:"
    for line in "${FP_PATHS[@]}"; do echo "#   $line"; done
    echo "# container binds (host paths, bound as given):"
    for bind in "${FP_BINDS[@]}"; do echo "#   $bind"; done
    for dir in "${FP_MKDIRS[@]}"; do echo "# created by the job before srun: $dir"; done
    if [[ -n "${APPTAINERENV_LD_LIBRARY_PATH:-}" ]]; then
        echo "# container library path: ${APPTAINERENV_LD_LIBRARY_PATH} (the image's own after the host libfabric)"
    fi
    if fp_ofi_watch_wanted; then
        echo "# RCCL's OFI plugin is checked: NCCL_DEBUG=$NCCL_DEBUG NCCL_DEBUG_SUBSYS=$NCCL_DEBUG_SUBSYS, stop after ${FORGEPIPE_OFI_TIMEOUT}s without 'Using network OFI'"
    fi
fi

# The config forgepipe will resolve, for the job's world (rank 0 of NODES x GPUS_PER_NODE ranks).
# `config show` takes one stage: the pipeline shows its first (sft); PPO's actor is its --model.
case "$stage" in
    sft|reward|dpo) show=(--stage "$stage" "${FP_MODEL_ARGS[@]}") ;;
    ppo)
        show=(--stage ppo --model "${ACTOR:-$MODEL}" "ppo.reward_model=$REWARD_MODEL")
        [[ -n "${CRITIC:-}" ]] && show+=(--critic "$CRITIC") ;;
    pipeline) show=(--stage sft --model "$MODEL") ;;
esac
if [[ "$FORGEPIPE_LAUNCHER" == apptainer ]] && command -v apptainer >/dev/null; then
    runner=(apptainer exec "$IMAGE" forgepipe)
elif [[ "$FORGEPIPE_LAUNCHER" == apptainer ]] && command -v forgepipe >/dev/null; then
    echo "# (no apptainer here: resolving with the forgepipe on PATH instead of the image's)"
    runner=(forgepipe)
elif [[ "$FORGEPIPE_LAUNCHER" == direct ]] && command -v "$FORGEPIPE_BIN" >/dev/null; then
    runner=("$FORGEPIPE_BIN")
else
    fp_die "cannot resolve the config here: neither apptainer nor $FORGEPIPE_BIN is on PATH (the lines above are what would run)"
fi
# A login node has no GPU: check the config as the GPU job will.
[[ "${FORGEPIPE_DEVICE:-gpu}" == cpu ]] || show+=(--assume-gpu)
echo "# resolved config (forgepipe config show):"
env SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS="$((NODES * GPUS_PER_NODE))" \
    SLURM_NTASKS_PER_NODE="$GPUS_PER_NODE" SLURM_JOB_NODELIST="${SLURM_JOB_NODELIST:-localhost}" \
    "${runner[@]}" config show "${show[@]}" "${FP_COMMON_ARGS[@]}"
