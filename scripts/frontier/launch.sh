# shellcheck shell=bash
# Shared launch logic for the forgepipe batch scripts: check the settings, build the srun line,
# run it. Sourced by scripts/frontier/{sft,reward,ppo,pipeline}.sbatch and by submit.sh.
#
# Settings (environment variables; see docs/containers.md for the full list):
#   IMAGE        forge.sif (container launcher)      MODEL        model path or catalog name
#   DATA         data sources, comma-separated       OUTPUT_DIR   where the stage writes
#   ACTOR        PPO actor (default MODEL)           REWARD_MODEL PPO reward model / pipeline reward backbone
#   CRITIC, CONFIG, ZERO_STAGE, OFFLOAD, ZEROPP (1/0), HPZ_SIZE, DTYPE, MAX_STEPS, TRACKING_URI,
#   EXPERIMENT, RUN_NAME, RESUME: passed to forgepipe as the matching option when set.
# Extra arguments to fp_launch go to forgepipe unchanged.

FP_FRONTIER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/frontier/env.sh
. "$FP_FRONTIER_DIR/env.sh"

fp_die() {
    echo "forgepipe: $*" >&2
    exit 2
}

fp_missing() {  # fp_missing NAME HINT: stop, naming the missing setting
    fp_die "missing setting $1: $2"
}

# Stage-specific model settings, in the order they are checked.
fp_model_settings() {
    case "$1" in
        sft|reward) echo MODEL ;;
        ppo) echo ACTOR REWARD_MODEL ;;
        pipeline) echo MODEL REWARD_MODEL ;;
    esac
}

# fp_check STAGE [submit]: every required setting is there, before anything is submitted or run.
fp_check() {
    local stage="$1" when="${2:-job}" name
    case "$stage" in
        sft|reward|ppo|pipeline) ;;
        *) fp_die "unknown stage '$stage' (expected sft, reward, ppo or pipeline)" ;;
    esac
    case "$FORGEPIPE_LAUNCHER" in apptainer|direct) ;; *) fp_die "FORGEPIPE_LAUNCHER='$FORGEPIPE_LAUNCHER' is not apptainer or direct" ;; esac
    case "$FORGEPIPE_DEVICE" in gpu|cpu) ;; *) fp_die "FORGEPIPE_DEVICE='$FORGEPIPE_DEVICE' is not gpu or cpu" ;; esac
    case "$FORGEPIPE_GPU_BIND" in all|closest) ;; *) fp_die "FORGEPIPE_GPU_BIND='$FORGEPIPE_GPU_BIND' is not all or closest" ;; esac
    if [[ "$when" == submit && -z "${ACCOUNT:-${SBATCH_ACCOUNT:-}}" ]]; then
        fp_missing ACCOUNT "set ACCOUNT=<project id> (the Slurm account the job is charged to)"
    fi
    if [[ "$FORGEPIPE_LAUNCHER" == apptainer ]]; then
        [[ -n "${IMAGE:-}" ]] || fp_missing IMAGE "set IMAGE=/path/to/forge.sif (build it with 'make sif'), or FORGEPIPE_LAUNCHER=direct"
        [[ -f "$IMAGE" ]] || fp_die "IMAGE: no image file at $IMAGE (build it with 'make sif' or fix the path)"
    fi
    [[ "$stage" == ppo && -z "${ACTOR:-}" ]] && ACTOR="${MODEL:-}"
    for name in $(fp_model_settings "$stage"); do
        [[ -n "${!name:-}" ]] || fp_missing "$name" "set $name=<model directory or catalog name> for the $stage stage"
    done
    [[ -n "${DATA:-}" ]] || fp_missing DATA "set DATA=<file, dataset dir or Hub name>[,<more>...]"
    [[ -n "${OUTPUT_DIR:-}" ]] || fp_missing OUTPUT_DIR "set OUTPUT_DIR=<directory the stage writes to>"
}

# Does this launch turn on ZeRO++ (zeropp) or its quantized gradients (qgz)? Reads ZEROPP and args.
fp_zeropp_flags() {
    local zeropp=0 qgz_explicit="" arg
    [[ "${ZEROPP:-0}" == 1 ]] && zeropp=1
    for arg in "$@"; do
        case "$arg" in
            --zeropp) zeropp=1 ;;
            --no-zeropp) zeropp=0 ;;
            --quantized-gradients) qgz_explicit=1 ;;
            --no-quantized-gradients) qgz_explicit=0 ;;
        esac
    done
    FP_ZEROPP=$zeropp
    FP_QGZ="${qgz_explicit:-$zeropp}"
}

# fp_forgepipe_args STAGE [extra...]: FP_MODEL_ARGS (stage-specific) and FP_COMMON_ARGS.
fp_forgepipe_args() {
    local stage="$1" item
    shift
    case "$stage" in
        sft|reward) FP_MODEL_ARGS=(--model "$MODEL") ;;
        ppo)
            FP_MODEL_ARGS=(--actor "${ACTOR:-$MODEL}" --reward "$REWARD_MODEL")
            [[ -n "${CRITIC:-}" ]] && FP_MODEL_ARGS+=(--critic "$CRITIC") ;;
        pipeline) FP_MODEL_ARGS=(--model "$MODEL" --reward-model "$REWARD_MODEL") ;;
    esac
    FP_COMMON_ARGS=()
    local -a sources
    IFS=, read -r -a sources <<< "$DATA"
    for item in "${sources[@]}"; do FP_COMMON_ARGS+=(--data "$item"); done
    FP_COMMON_ARGS+=(--output-dir "$OUTPUT_DIR")
    [[ -n "${CONFIG:-}" ]] && FP_COMMON_ARGS+=(--config "$CONFIG")
    [[ -n "${ZERO_STAGE:-}" ]] && FP_COMMON_ARGS+=(--zero-stage "$ZERO_STAGE")
    [[ -n "${OFFLOAD:-}" ]] && FP_COMMON_ARGS+=(--offload "$OFFLOAD")
    [[ "${ZEROPP:-}" == 1 ]] && FP_COMMON_ARGS+=(--zeropp)
    [[ -n "${DTYPE:-}" ]] && FP_COMMON_ARGS+=(--dtype "$DTYPE")
    [[ -n "${MAX_STEPS:-}" ]] && FP_COMMON_ARGS+=(--max-steps "$MAX_STEPS")
    [[ -n "${TRACKING_URI:-}" ]] && FP_COMMON_ARGS+=(--tracking-uri "$TRACKING_URI")
    [[ -n "${EXPERIMENT:-}" ]] && FP_COMMON_ARGS+=(--experiment "$EXPERIMENT")
    [[ -n "${RUN_NAME:-}" ]] && FP_COMMON_ARGS+=(--run-name "$RUN_NAME")
    [[ -n "${RESUME:-}" ]] && FP_COMMON_ARGS+=(--resume "$RESUME")
    fp_zeropp_flags "$@"
    # hpZ's secondary partition defaults to one node's GPUs (intra-node all-gathers only).
    if [[ "$FP_ZEROPP" == 1 && " $* " != *" --hpz-size "* ]]; then
        FP_COMMON_ARGS+=(--hpz-size "${HPZ_SIZE:-$GPUS_PER_NODE}")
    elif [[ -n "${HPZ_SIZE:-}" ]]; then
        FP_COMMON_ARGS+=(--hpz-size "$HPZ_SIZE")
    fi
    if [[ "$FORGEPIPE_DEVICE" == gpu && "$FORGEPIPE_GPU_BIND" == closest && "$FP_QGZ" == 1 ]]; then
        fp_die "ZeRO++ qgZ needs every GCD of a node visible to each rank: DeepSpeed sizes its all-to-all groups from device_count(), which is 1 under FORGEPIPE_GPU_BIND=closest; use FORGEPIPE_GPU_BIND=all (the default) or add --no-quantized-gradients"
    fi
    FP_COMMON_ARGS+=("$@")
}

# Host directories the container must see: system binds, FORGEPIPE_BINDS, and the existing
# directories of the model, data, output, config and sqlite tracking paths.
fp_binds() {
    local -a paths=() dirs=()
    local p d seen=","
    IFS=, read -r -a paths <<< "$FORGEPIPE_SYSTEM_BINDS${FORGEPIPE_BINDS:+,$FORGEPIPE_BINDS}"
    for p in "${paths[@]}"; do [[ -e "$p" ]] && dirs+=("$p"); done
    local -a candidates=("${MODEL:-}" "${ACTOR:-}" "${REWARD_MODEL:-}" "${CRITIC:-}" "${CONFIG:-}" "$OUTPUT_DIR")
    IFS=, read -r -a paths <<< "$DATA"
    candidates+=("${paths[@]}")
    [[ "${TRACKING_URI:-}" == sqlite:///* ]] && candidates+=("${TRACKING_URI#sqlite://}")
    for p in "${candidates[@]}"; do
        [[ -n "$p" ]] || continue
        if [[ -d "$p" ]]; then d="$p"; elif [[ -e "$p" || -d "$(dirname "$p")" ]]; then d="$(dirname "$p")"; else continue; fi
        d="$(cd "$d" && pwd -P)"
        [[ "$seen" == *",$d,"* ]] && continue
        seen+="$d,"
        dirs+=("$d")
    done
    (IFS=,; echo "${dirs[*]}")
}

# fp_srun_cmd STAGE: FP_SRUN, the full srun command line (after fp_forgepipe_args).
fp_srun_cmd() {
    local stage="$1" image="${FP_IMAGE:-${IMAGE:-}}"
    FP_SRUN=(srun -N "$NODES" -n "$((NODES * GPUS_PER_NODE))" --ntasks-per-node="$GPUS_PER_NODE"
        "-c$CPUS_PER_TASK" --cpu-bind=cores --kill-on-bad-exit=1)
    if [[ "$FORGEPIPE_DEVICE" == gpu ]]; then
        # all: no per-task GPU binding, every rank sees the node's GCDs (see env.sh).
        if [[ "$FORGEPIPE_GPU_BIND" == all ]]; then
            FP_SRUN+=(--gpus-per-node="$GPUS_PER_NODE" --gpu-bind=none)
        else
            FP_SRUN+=(--gpus-per-node="$GPUS_PER_NODE" --gpu-bind=closest)
        fi
    fi
    if [[ "$FORGEPIPE_LAUNCHER" == apptainer ]]; then
        FP_SRUN+=(apptainer exec)
        [[ "$FORGEPIPE_DEVICE" == gpu ]] && FP_SRUN+=(--rocm)
        FP_SRUN+=(--bind "$(fp_binds)" "$image" forgepipe)
    else
        FP_SRUN+=("$FORGEPIPE_BIN")
    fi
    FP_SRUN+=("$stage" "${FP_MODEL_ARGS[@]}" "${FP_COMMON_ARGS[@]}")
}

fp_print_cmd() {  # a command line, quoted only where the shell needs it, so that it can be pasted
    local word line=""
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then line+="$word "; else line+="$(printf '%q' "$word") "; fi
    done
    echo "${line% }"
}

# Copy the image to every node's NVMe once (FORGEPIPE_STAGE_IMAGE=1; the job needs -C nvme).
fp_stage_image() {
    FP_IMAGE="${IMAGE:-}"
    if [[ "$FORGEPIPE_STAGE_IMAGE" == 1 && "$FORGEPIPE_LAUNCHER" == apptainer ]]; then
        FP_IMAGE="$FORGEPIPE_NVME_DIR/$(basename "$IMAGE")"
        echo "forgepipe: staging $IMAGE to $FP_IMAGE on $NODES node(s)"
        sbcast --force --preserve "$IMAGE" "$FP_IMAGE" || fp_die "sbcast of $IMAGE to $FP_IMAGE failed (was the job submitted with -C nvme?)"
    fi
}

# fp_launch STAGE [forgepipe args...]: the body of every batch script.
fp_launch() {
    local stage="$1"
    shift
    fp_check "$stage" job
    fp_forgepipe_args "$stage" "$@"
    mkdir -p "$OUTPUT_DIR"
    fp_stage_image
    fp_srun_cmd "$stage"
    if [[ "$FORGEPIPE_DEVICE" == gpu && "$FORGEPIPE_GPU_BIND" == all ]]; then
        # cuda:LOCAL_RANK is then the GCD nearest the rank's cores (forgepipe.distributed.device_for).
        local -a order
        IFS=, read -r -a order <<< "$FORGEPIPE_GCD_ORDER"
        (( ${#order[@]} == GPUS_PER_NODE )) && export HIP_VISIBLE_DEVICES="$FORGEPIPE_GCD_ORDER"
    fi
    echo "forgepipe: $(fp_print_cmd "${FP_SRUN[@]}")"
    local rc=0
    "${FP_SRUN[@]}" || rc=$?
    if (( rc == FORGEPIPE_EXIT_REQUEUE )) && [[ -n "${SLURM_JOB_ID:-}" && "${FORGEPIPE_REQUEUE:-1}" == 1 ]]; then
        echo "forgepipe: stopped for resubmission (exit $rc); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
