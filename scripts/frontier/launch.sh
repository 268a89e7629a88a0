# shellcheck shell=bash
# Shared launch logic for the forgepipe batch scripts: check the settings, build the srun line,
# run it. Sourced by scripts/frontier/{sft,reward,ppo,pipeline}.sbatch and by submit.sh.
#
# Settings (environment variables; README.md, "Running on Frontier", lists them all):
#   IMAGE        forge.sif (container launcher)      MODEL        model path or catalog name
#   DATA         data sources, comma-separated       OUTPUT_DIR   where the stage writes
#   ACTOR        PPO actor (default MODEL)           REWARD_MODEL PPO reward model / pipeline reward backbone
#   CRITIC, CONFIG, ZERO_STAGE, OFFLOAD, ZEROPP (1/0), HPZ_SIZE, DTYPE, MAX_STEPS, TRACKING_URI,
#   EXPERIMENT, RUN_NAME, RESUME: passed to forgepipe as the matching option when set.
#   FORGEPIPE_SIGNAL_LEAD (seconds of walltime warning), FORGEPIPE_MAX_RESUBMITS (10): see below.
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
        sft|reward|dpo) echo MODEL ;;
        ppo) echo ACTOR REWARD_MODEL ;;
        pipeline) echo MODEL REWARD_MODEL ;;
    esac
}

# fp_check STAGE [submit]: every required setting is there, before anything is submitted or run.
fp_check() {
    local stage="$1" when="${2:-job}" name
    case "$stage" in
        sft|reward|ppo|dpo|pipeline) ;;
        *) fp_die "unknown stage '$stage' (expected sft, reward, ppo, dpo or pipeline)" ;;
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
    # Between nodes RCCL needs the host's Cray libfabric (CXI provider) inside the container.
    if [[ "$FORGEPIPE_SITE" == frontier && "$FORGEPIPE_LAUNCHER" == apptainer && "$FORGEPIPE_DEVICE" == gpu ]] && (( NODES > 1 )); then
        [[ -n "$FORGEPIPE_LIBFABRIC_DIR" ]] \
            || fp_missing FORGEPIPE_LIBFABRIC_DIR "no libfabric.so.1 on LD_LIBRARY_PATH: 'module load libfabric' (the job inherits it) or set FORGEPIPE_LIBFABRIC_DIR=/opt/cray/libfabric/<version>/lib64"
        [[ -e "$FORGEPIPE_LIBFABRIC_DIR/libfabric.so.1" ]] \
            || fp_die "FORGEPIPE_LIBFABRIC_DIR: no libfabric.so.1 in $FORGEPIPE_LIBFABRIC_DIR"
        # The image's RCCL network plugin links against libfabric 2.x symbols.
        local version
        version="$(fp_libfabric_version "$FORGEPIPE_LIBFABRIC_DIR")"
        if [[ "$version" =~ ^([0-9]+)\. ]] && (( BASH_REMATCH[1] < 2 )); then
            fp_die "FORGEPIPE_LIBFABRIC_DIR: libfabric $version in $FORGEPIPE_LIBFABRIC_DIR; RCCL's network plugin in the image needs libfabric >= 2.0: load a libfabric 2.x module (module avail libfabric) or set FORGEPIPE_LIBFABRIC_DIR to one"
        fi
    fi
}

# fp_libfabric_version DIR: the version of the libfabric in DIR (its lib64): `fi_info --version`
# beside it, else the Cray module's directory name (/opt/cray/libfabric/<version>/lib64); empty if
# neither tells.
fp_libfabric_version() {
    local dir="$1" version=""
    if [[ -x "$dir/../bin/fi_info" ]]; then
        version="$(LD_LIBRARY_PATH="$dir" "$dir/../bin/fi_info" --version 2>/dev/null | sed -n 's/^libfabric: *\([0-9][0-9.]*\).*/\1/p' | head -n1)"
    fi
    if [[ -z "$version" && "$dir" =~ /libfabric/([0-9]+\.[0-9][0-9.]*)(/|$) ]]; then version="${BASH_REMATCH[1]}"; fi
    echo "$version"
}

# --- Frontier's scheduling policy ----------------------------------------------------------------
# OLCF's Frontier user guide ("Scheduling Policy"): in the batch partition the longest walltime
# depends on the node count, 2 h for 1-91 nodes, 6 h for 92-183, 12 h for 184-9408; the extended
# partition takes up to 64 nodes for up to 24 h; the debug QOS at most 2 h, one job per user, and
# no job chains (a dependent job is refused: no resubmission there). Slurm would accept such a job
# into the queue and never start it, or refuse it after the wait; submit.sh refuses it at once.
# fp_check_policy: one line and exit 2 when NODES, WALLTIME, PARTITION and QOS (SBATCH_QOS,
# SBATCH_PARTITION, and any -N/-t/-p/-q in SBATCH_ARGS, which come last and win) break it;
# FP_POLICY is what the dry run says; under the debug QOS the resubmission chain is turned off.
# FORGEPIPE_POLICY_CHECK=0 skips the limits (another cluster, or a reservation).
fp_check_policy() {
    : "${WALLTIME:=02:00:00}"
    local walltime="$WALLTIME" nodes="$NODES" qos="${QOS:-${SBATCH_QOS:-}}" part="${PARTITION:-${SBATCH_PARTITION:-}}"
    local -a words=()
    local i w v secs limit bin chain=0
    read -r -a words <<< "${SBATCH_ARGS:-}"
    for (( i = 0; i < ${#words[@]}; i++ )); do
        w="${words[i]}"
        case "$w" in
            --time=* | --nodes=* | --qos=* | --partition=*) v="${w#*=}"; w="${w%%=*}" ;;
            -t | --time | -N | --nodes | -q | --qos | -p | --partition) v="${words[i + 1]:-}"; i=$(( i + 1 )) ;;
            -t?* | -N?* | -q?* | -p?*) v="${w:2}"; w="${w:0:2}" ;;
            --dependency* | -d*) chain=1; continue ;;
            *) continue ;;
        esac
        case "$w" in -t | --time) walltime="$v" ;; -N | --nodes) nodes="$v" ;; -q | --qos) qos="$v" ;; -p | --partition) part="$v" ;; esac
    done
    FP_POLICY=""
    [[ "$FORGEPIPE_SITE" == frontier && "${FORGEPIPE_POLICY_CHECK:-1}" == 1 ]] || return 0
    secs="$(fp_walltime_seconds "$walltime")"
    [[ -n "$secs" ]] || fp_die "WALLTIME='$walltime' is not a walltime sbatch reads (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)"
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || fp_die "NODES='$nodes' is not a node count"
    if [[ "$part" == extended ]]; then
        (( nodes <= 64 )) || fp_die "NODES=$nodes: Frontier's extended partition takes at most 64 nodes; use the batch partition (PARTITION unset) for more"
        limit=24; bin="the extended partition (1-64 nodes)"
    elif (( nodes > 9408 )); then
        fp_die "NODES=$nodes: Frontier has 9408 nodes"
    elif (( nodes >= 184 )); then limit=12; bin="184-9408 nodes"
    elif (( nodes >= 92 )); then limit=6; bin="92-183 nodes"
    else limit=2; bin="1-91 nodes"
    fi
    if [[ "$qos" == debug ]]; then
        (( chain == 0 )) || fp_die "QOS=debug: OLCF forbids chained (dependent) jobs in the debug QOS; drop --dependency from SBATCH_ARGS"
        if (( secs > 7200 )); then
            fp_die "WALLTIME $walltime is over the debug QOS's 2 h; use WALLTIME=02:00:00 or less, or drop QOS=debug"
        fi
        if (( FORGEPIPE_MAX_RESUBMITS > 0 )); then
            export FORGEPIPE_MAX_RESUBMITS=0
            FP_POLICY="QOS debug: at most 2 h, and no resubmission chain (OLCF forbids chained jobs there); submit again to continue a stopped run. "
        fi
    fi
    if (( secs > limit * 3600 )); then
        local hh hint
        printf -v hh '%02d' "$limit"
        hint="use WALLTIME=$hh:00:00 or less (a run stopped by the walltime resubmits itself and continues)"
        if (( limit == 2 )); then hint+=", NODES=92 or more for 6 h"; fi
        if (( nodes <= 64 )) && [[ "$part" != extended ]]; then hint+=", or PARTITION=extended (24 h, up to 64 nodes)"; fi
        fp_die "WALLTIME $walltime is over Frontier's ${limit} h for $bin (NODES=$nodes${part:+, PARTITION=$part}); $hint"
    fi
    FP_POLICY+="walltime $walltime within Frontier's ${limit} h for $bin${qos:+ (QOS $qos)}"
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
        sft|reward|dpo) FP_MODEL_ARGS=(--model "$MODEL") ;;
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

# fp_path PATH: PATH made absolute as given (symlinks kept, not resolved: the stage is handed the
# path as the user wrote it, so that is the path that must exist in the container).
fp_path() {
    local p="$1"
    [[ "$p" == /* ]] || p="$PWD/$p"
    realpath -s -m -- "$p"
}

# fp_store_dir URI: the directory of a local MLflow store, resolved as forgepipe resolves it
# (tracking.absolute_uri: Path.resolve() against the working directory, symlinks followed):
# sqlite:///mlruns/mlflow.db (three slashes) is ./mlruns, sqlite:////abs/mlflow.db is /abs; file:
# URIs and plain directories likewise; a server prints nothing.
fp_store_dir() {
    local uri="$1" path
    case "$uri" in
        sqlite:///*) path="${uri#sqlite:///}"; [[ "$path" == :memory: ]] && return 0; dirname "$(realpath -m -- "$path")" ;;
        file://*) path="${uri#file://}"; printf '%s\n' "${path#localhost}" ;;
        file:*) realpath -m -- "${uri#file:}" ;;
        *://*) ;;
        *) [[ "${uri%%/*}" == *:* ]] || realpath -m -- "$uri" ;;
    esac
}

# fp_flag_paths ARG...: FP_FLAG_READS and FP_FLAG_WRITES, the paths a forgepipe command line names
# in its path options alone (model, actor, reward, reward-model, critic, ref, tokenizer, data,
# unsupervised data, config, catalog, chat template, resume; output dir, cache dir, the tracking
# store, $MLFLOW_TRACKING_URI's or ./mlruns without one), $FORGEPIPE_MODEL_ROOT and the absolute
# paths of the catalogs. Used only where forgepipe cannot list the config's own paths (no
# apptainer and no forgepipe here), and for what a containerised `forgepipe config paths` must
# see to read the config and the catalogs (FP_FLAG_CONFIGS).
fp_flag_paths() {
    local opt value tracking="${MLFLOW_TRACKING_URI:-sqlite:///mlruns/mlflow.db}" p d
    local read_opts=" --model --actor --reward --reward-model --critic --ref --tokenizer --data --unsupervised-data --config --catalog --chat-template --resume "
    local path_opts="$read_opts--output-dir --cache-dir --tracking-uri "
    local -a catalogs=()
    FP_FLAG_READS=()
    FP_FLAG_WRITES=()
    FP_FLAG_CONFIGS=()
    while (( $# )); do
        opt="$1"
        shift
        if [[ "$opt" == --*=* ]]; then
            value="${opt#*=}"
            opt="${opt%%=*}"
        elif [[ "$path_opts" == *" $opt "* ]] && (( $# )); then
            value="$1"
            shift
        else
            continue
        fi
        case "$opt" in
            --output-dir | --cache-dir) FP_FLAG_WRITES+=("$value") ;;
            --tracking-uri) tracking="$value" ;;
            --catalog) catalogs+=("$value"); FP_FLAG_READS+=("$value"); FP_FLAG_CONFIGS+=("$value") ;;
            --config) FP_FLAG_READS+=("$value"); FP_FLAG_CONFIGS+=("$value") ;;
            *) FP_FLAG_READS+=("$value") ;;
        esac
    done
    d="$(fp_store_dir "$tracking")"
    [[ -z "$d" ]] || FP_FLAG_WRITES+=("$d")
    if [[ -n "${FORGEPIPE_CATALOG:-}" ]]; then
        catalogs+=("$FORGEPIPE_CATALOG"); FP_FLAG_READS+=("$FORGEPIPE_CATALOG"); FP_FLAG_CONFIGS+=("$FORGEPIPE_CATALOG")
    fi
    if [[ -n "${FORGEPIPE_MODEL_ROOT:-}" ]]; then FP_FLAG_READS+=("$FORGEPIPE_MODEL_ROOT"); fi
    for p in "${catalogs[@]}"; do
        [[ -f "$p" ]] || continue
        while IFS= read -r d; do FP_FLAG_READS+=("$d"); done < <(sed -n 's/^[^#]*:[[:space:]]*\(\/[^[:space:],}#]*\).*$/\1/p' "$p")
    done
    return 0
}

# fp_path_lister: FP_LISTER, the command that runs `forgepipe config paths` here: the image's own
# forgepipe (apptainer exec, binds added per call), else $FORGEPIPE_BIN on PATH; empty when neither
# is here (the command line's path options are then all there is to go by).
fp_path_lister() {
    FP_LISTER=()
    FP_LISTER_IMAGE=""
    if [[ "$FORGEPIPE_LAUNCHER" == apptainer ]] && command -v apptainer >/dev/null; then
        FP_LISTER=(apptainer exec)
        FP_LISTER_IMAGE="${FP_IMAGE:-${IMAGE:-}}"
    elif command -v "$FORGEPIPE_BIN" >/dev/null; then
        FP_LISTER=("$FORGEPIPE_BIN")
    fi
    return 0
}

fp_bind_dir() {  # fp_bind_dir PATH: the directory to bind for a path that is read (nothing if absent)
    local p="$1"
    [[ -n "$p" && "$p" != *://* ]] || return 0
    if [[ -d "$p" ]]; then fp_path "$p"; elif [[ -e "$p" ]]; then fp_path "$(dirname "$p")"; fi
}

# fp_binds STAGE ARG...: FP_BINDS, the host directories the container must see for `forgepipe
# STAGE ARG...` (FP_MODEL_ARGS + FP_COMMON_ARGS, the user's own options included), and FP_MKDIRS,
# the ones the stage writes that may not exist yet (fp_launch creates them just before srun; a dry
# run creates nothing). forgepipe itself lists what the resolved config reads and writes
# (`forgepipe config paths STAGE ARG...`, forgepipe/paths.py: models and catalog names, DPO's
# reference, the chat template, data, paths inside a --config YAML, catalog entries with $VARS, the
# output, cache and tracking-store directories), run at submit time and again in the job; FP_PATHS
# keeps its lines for the dry run. Bound: the system binds and FORGEPIPE_BINDS; the directory (or a
# file's directory) of every read path that exists; every written directory, existing or not. Paths
# are bound as given (absolute, symlinks kept), the tracking store as forgepipe resolves its URI.
fp_binds() {
    local stage="$1" p d line access what listed err rc seen=","
    shift
    local -a paths=() reads=() writes=() boot=()
    FP_BINDS=()
    FP_MKDIRS=()
    FP_PATHS=()
    IFS=, read -r -a paths <<< "$FORGEPIPE_SYSTEM_BINDS${FORGEPIPE_BINDS:+,$FORGEPIPE_BINDS}"
    for p in "${paths[@]}"; do
        if [[ -n "$p" && -e "$p" && "$seen" != *",$p,"* ]]; then seen+="$p,"; FP_BINDS+=("$p"); fi
    done
    fp_flag_paths "$@"
    fp_path_lister
    # shellcheck disable=SC2034  # FP_PATHS_FROM: printed by submit.sh and run.sh
    if (( ${#FP_LISTER[@]} == 0 )); then
        FP_PATHS_FROM="the command line's path options (no apptainer or $FORGEPIPE_BIN here to list the config's own)"
        reads=("${FP_FLAG_READS[@]}")
        writes=("${FP_FLAG_WRITES[@]}")
    else
        FP_PATHS_FROM="forgepipe config paths"
        # In the image, forgepipe sees only what is bound: the config and catalog files'
        # directories; a catalog named inside the YAML is bound for a second pass.
        for p in "${FP_FLAG_CONFIGS[@]}"; do d="$(fp_bind_dir "$p")"; [[ -z "$d" ]] || boot+=("$d"); done
        listed=""
        for _ in 1 2 3; do
            local -a lister=("${FP_LISTER[@]}")
            if [[ -n "$FP_LISTER_IMAGE" ]]; then
                (( ${#boot[@]} == 0 )) || lister+=(--bind "$(IFS=,; echo "${boot[*]}")")
                lister+=("$FP_LISTER_IMAGE" forgepipe)
            fi
            err="$(mktemp "${TMPDIR:-/tmp}/forgepipe-paths.XXXXXX")"
            rc=0
            line="$("${lister[@]}" config paths "$stage" "$@" 2>"$err")" || rc=$?
            if (( rc != 0 )); then
                local msg
                msg="$(grep -m1 'forgepipe: ' "$err" || tail -n1 "$err")"
                rm -f "$err"
                fp_die "cannot list the paths the $stage stage reads and writes: ${msg#forgepipe: }"
            fi
            rm -f "$err"
            [[ -z "$FP_LISTER_IMAGE" || "$line" != "$listed" ]] || break
            listed="$line"
            [[ -n "$FP_LISTER_IMAGE" ]] || break
            local grew=0
            while IFS=$'\t' read -r access what p; do
                [[ "$access" == read && "$what" == model.catalog ]] || continue  # all it reads
                d="$(fp_bind_dir "$p")"
                if [[ -n "$d" && " ${boot[*]} " != *" $d "* ]]; then boot+=("$d"); grew=1; fi
            done <<< "$listed"
            (( grew )) || break
        done
        while IFS=$'\t' read -r access what p; do
            [[ -n "$access" ]] || continue
            FP_PATHS+=("$access $what $p")
            if [[ "$access" == write ]]; then writes+=("$p"); else reads+=("$p"); fi
        done <<< "$listed"
    fi
    for p in "${reads[@]}"; do
        d="$(fp_bind_dir "$p")"
        if [[ -n "$d" && "$seen" != *",$d,"* ]]; then seen+="$d,"; FP_BINDS+=("$d"); fi
    done
    for p in "${writes[@]}"; do
        [[ -n "$p" ]] || continue
        d="$(fp_path "$p")"
        [[ -d "$d" || " ${FP_MKDIRS[*]} " == *" $d "* ]] || FP_MKDIRS+=("$d")
        if [[ "$seen" != *",$d,"* ]]; then seen+="$d,"; FP_BINDS+=("$d"); fi
    done
    return 0
}

# fp_srun_cmd STAGE: FP_SRUN, the full srun command line (after fp_forgepipe_args).
fp_srun_cmd() {
    local stage="$1" image="${FP_IMAGE:-${IMAGE:-}}"
    FP_BINDS=()
    FP_MKDIRS=()
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
        # The image as the user named it (APPTAINER_CONTAINER is the NVMe copy when staged), for
        # the run's record (forgepipe/tracking.py keeps FORGEPIPE_* variables in environment.json).
        export APPTAINERENV_FORGEPIPE_IMAGE="${APPTAINERENV_FORGEPIPE_IMAGE:-$(fp_path "${IMAGE:-$image}")}"
        # No --rocm: it binds host libdrm, libnuma, libelf over the image's (which has its own ROCm);
        # /dev/kfd and /dev/dri come with /dev. Host libraries: the network path only (env.sh).
        FP_SRUN+=(apptainer exec)
        fp_binds "$stage" "${FP_MODEL_ARGS[@]}" "${FP_COMMON_ARGS[@]}"
        FP_SRUN+=(--bind "$(IFS=,; echo "${FP_BINDS[*]}")" "$image" forgepipe)
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

fp_walltime_seconds() {  # sbatch -t forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; empty if another
    local t="$1" days=0 a b c
    if [[ "$t" =~ ^([0-9]+)-(.*)$ ]]; then
        days="${BASH_REMATCH[1]}"
        t="${BASH_REMATCH[2]}"
        IFS=: read -r a b c <<< "$t"
        echo $(( ((10#$days * 24 + 10#$a) * 60 + 10#${b:-0}) * 60 + 10#${c:-0} ))
    elif [[ "$t" =~ ^[0-9]+(:[0-9]+){0,2}$ ]]; then
        IFS=: read -r a b c <<< "$t"
        if [[ -n "$c" ]]; then echo $(( (10#$a * 60 + 10#$b) * 60 + 10#$c ))
        else echo $(( 10#$a * 60 + 10#${b:-0} )); fi
    fi
}

# Seconds of warning before the walltime: FORGEPIPE_SIGNAL_LEAD, else 10 minutes (a checkpoint of
# a 25B model on Lustre, with margin), but at most a fifth of the walltime: with a short debug
# walltime the warning would otherwise come at once, and every job of the chain stop at its first step.
# (Slurm sends it up to 60 s early: its time-limit checks run every 30 s or so.)
fp_signal_lead() {
    local walltime
    if [[ -n "${FORGEPIPE_SIGNAL_LEAD:-}" ]]; then echo "$FORGEPIPE_SIGNAL_LEAD"; return; fi
    walltime="$(fp_walltime_seconds "$WALLTIME")"
    if [[ -n "$walltime" ]] && (( walltime / 5 < 600 )); then echo $(( walltime / 5 )); else echo 600; fi
}

# fp_sbatch_cmd STAGE: FP_SBATCH, the sbatch command and options (no script) for the settings:
# ACCOUNT, NODES, WALLTIME, PARTITION, QOS, FORGEPIPE_SIGNAL_LEAD, FORGEPIPE_STAGE_IMAGE,
# FORGEPIPE_ALT_RDZV, SBATCH_ARGS, LOG_DIR. Used by submit.sh and by a job resubmitting itself,
# so both submit the same job. The settings are exported: the job (and its resubmission) sees them.
fp_sbatch_cmd() {
    local stage="$1"
    : "${WALLTIME:=02:00:00}"
    : "${LOG_DIR:=$PWD}"
    export WALLTIME LOG_DIR
    FP_SBATCH=(sbatch -A "${ACCOUNT:-${SBATCH_ACCOUNT:-${SLURM_JOB_ACCOUNT:-}}}" -N "$NODES" -t "$WALLTIME"
        -J "forgepipe-$stage" --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
        -o "$LOG_DIR/%x-%j.out")
    FP_SBATCH+=(--signal="B:USR1@$(fp_signal_lead)")
    [[ -n "${PARTITION:-}" ]] && FP_SBATCH+=(-p "$PARTITION")
    [[ -n "${QOS:-}" ]] && FP_SBATCH+=(-q "$QOS")
    [[ "$FORGEPIPE_STAGE_IMAGE" == 1 ]] && FP_SBATCH+=(-C nvme)
    [[ "$FORGEPIPE_ALT_RDZV" == 1 ]] && FP_SBATCH+=(--network=disable_rdzv_get)
    if [[ -n "${SBATCH_ARGS:-}" ]]; then
        local -a extra
        read -r -a extra <<< "$SBATCH_ARGS"
        FP_SBATCH+=("${extra[@]}")
    fi
    return 0
}

# --- Walltime: warning signal, checkpoint, resubmission -------------------------------------------
# Who gets the signal. The batch scripts ask for `--signal=B:USR1@600`: ten minutes before the
# walltime Slurm signals the batch shell only (B:). fp_on_warning, trapped here, passes the
# signal on to srun, and srun forwards it to every task of the step: forgepipe itself, or
# `apptainer exec`, whose starter forwards it to forgepipe in the container. Every rank finishes
# its optimizer step, they agree to stop, write a checkpoint and exit 85. Without B:, Slurm
# would signal the tasks directly and forgepipe would stop the same way, but the batch shell
# would never hear of it, and it must: srun's exit status is not reliably 85 (see fp_launch),
# and a rank still starting up has no handler yet and dies of the signal. srun runs in the
# background because bash runs a trap only between commands, never during a foreground srun.
# slurmstepd delivers a forwarded signal to every process of the step, a rank's children too: a
# helper a rank runs just then (DeepSpeed's JIT op builds on a CPU node; the image's ops are
# prebuilt) dies of it, which is why the warning should come well inside training.
#
# Then, when the step exited 85 or failed after the warning, did not finish the run, and wrote
# a checkpoint in this job (else the next job would get no further), the script submits itself
# again with the same settings and arguments and `--dependency=afterany:<this job>`, so the new
# job starts when this one has ended, and with RESUME=auto, so it continues from the checkpoint
# (a pipeline continues with the stage it was in: finished stages are skipped). At most
# FORGEPIPE_MAX_RESUBMITS times in a chain. `scancel` (SIGTERM to everything, the batch shell
# included) ends the chain; `scancel -b -s USR1 <job>` stops a job early and continues it in a new one.

fp_on_warning() {
    FP_WARNED=1
    echo "forgepipe: walltime warning (SIGUSR1) at $(date +%T): asking every rank to checkpoint and stop"
    if [[ -n "${FP_STEP_PID:-}" ]]; then kill -USR1 "$FP_STEP_PID" 2>/dev/null || true; fi
}

fp_wait() {  # fp_wait PID: its exit status; a trapped signal interrupts `wait`, so wait again
    local rc
    while :; do
        rc=0
        wait "$1" || rc=$?
        if (( rc > 128 )) && kill -0 "$1" 2>/dev/null; then continue; fi
        return "$rc"
    done
}

# fp_resubmit STAGE [forgepipe args...]: submit this stage again, to start after this job.
fp_resubmit() {
    local stage="$1" count="$FORGEPIPE_RESUBMIT_COUNT" arg skip=0 word limit
    shift
    if [[ "${QOS:-${SLURM_JOB_QOS:-}}" == debug ]]; then
        echo "forgepipe: not resubmitting: OLCF forbids chained jobs in the debug QOS; submit again to continue" >&2
        return 0
    fi
    if (( count >= FORGEPIPE_MAX_RESUBMITS )); then
        echo "forgepipe: not resubmitting: $count resubmission(s) already (FORGEPIPE_MAX_RESUBMITS=$FORGEPIPE_MAX_RESUBMITS); submit again to continue" >&2
        return 0
    fi
    # The new job continues from the checkpoint: drop --resume (never, or a directory) from the
    # arguments and set RESUME=auto; drop --wait and dependencies of the original submission.
    local -a args=() extra=() words=()
    for arg in "$@"; do
        if (( skip )); then skip=0; continue; fi
        case "$arg" in --resume) skip=1 ;; --resume=*) ;; *) args+=("$arg") ;; esac
    done
    read -r -a words <<< "${SBATCH_ARGS:-}"
    for word in "${words[@]}"; do
        if (( skip )); then skip=0; continue; fi
        case "$word" in --wait|-W|--dependency=*|-d?*) ;; --dependency|-d) skip=1 ;; *) extra+=("$word") ;; esac
    done
    SBATCH_ARGS="${extra[*]}"
    if [[ -z "${WALLTIME:-}" ]]; then
        # Submitted without submit.sh: this job's own limit (squeue prints it in a form that
        # sbatch -t reads back: M:SS, H:MM:SS or D-HH:MM:SS).
        limit="$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null || true)"
        if [[ "$limit" =~ ^[0-9:-]+$ ]]; then WALLTIME="$limit"; fi
    fi
    fp_sbatch_cmd "$stage"
    FP_SBATCH+=(--dependency="afterany:$SLURM_JOB_ID" "$FP_FRONTIER_DIR/$stage.sbatch" "${args[@]}")
    echo "forgepipe: resubmitting ($((count + 1)) of at most $FORGEPIPE_MAX_RESUBMITS): $(fp_print_cmd "${FP_SBATCH[@]}")"
    RESUME=auto FORGEPIPE_RESUBMIT_COUNT=$((count + 1)) "${FP_SBATCH[@]}" \
        || echo "forgepipe: resubmission failed; submit the same job again to continue" >&2
}

# fp_launch STAGE [forgepipe args...]: the body of every batch script.
fp_launch() {
    local stage="$1"
    shift
    FP_WARNED=0
    FP_STEP_PID=""
    trap fp_on_warning USR1
    fp_check "$stage" job
    fp_forgepipe_args "$stage" "$@"
    fp_stage_image
    fp_srun_cmd "$stage"
    # What the stage writes must exist before Apptainer can bind it.
    mkdir -p "$OUTPUT_DIR" "${FP_MKDIRS[@]}"
    if [[ "$FORGEPIPE_DEVICE" == gpu && "$FORGEPIPE_GPU_BIND" == all ]]; then
        # cuda:LOCAL_RANK is then the GCD nearest the rank's cores (forgepipe.distributed.device_for).
        local -a order
        IFS=, read -r -a order <<< "$FORGEPIPE_GCD_ORDER"
        (( ${#order[@]} == GPUS_PER_NODE )) && export HIP_VISIBLE_DEVICES="$FORGEPIPE_GCD_ORDER"
    fi
    local rc=0 started run_file="$OUTPUT_DIR/forgepipe-run.json"
    [[ "$stage" == pipeline ]] && run_file="$OUTPUT_DIR/ppo/forgepipe-run.json"  # its last stage's
    started="$(date +%s)"
    if (( FP_WARNED )); then
        echo "forgepipe: the walltime warning came before the run started; not starting it"
        rc=$FORGEPIPE_EXIT_REQUEUE
    else
        echo "forgepipe: $(fp_print_cmd "${FP_SRUN[@]}")"
        local watch_pid="" fifo="" verdict=""
        if fp_ofi_watch_wanted; then
            # srun's output goes through fp_ofi_watch (and on to the job log), which stops the
            # step if RCCL's libfabric plugin does not load.
            fifo="$(mktemp -u "${TMPDIR:-/tmp}/forgepipe-srun.XXXXXX")"
            verdict="$(mktemp "${TMPDIR:-/tmp}/forgepipe-ofi.XXXXXX")"
            mkfifo "$fifo"
            "${FP_SRUN[@]}" > "$fifo" 2>&1 &
            FP_STEP_PID=$!
            fp_ofi_watch "$FP_STEP_PID" "$verdict" < "$fifo" &
            watch_pid=$!
        else
            "${FP_SRUN[@]}" &
            FP_STEP_PID=$!
        fi
        if (( FP_WARNED )); then kill -USR1 "$FP_STEP_PID" 2>/dev/null || true; fi  # came just now
        fp_wait "$FP_STEP_PID" || rc=$?
        if [[ -n "$watch_pid" ]]; then
            fp_wait "$watch_pid" || true
            rm -f "$fifo"
            if [[ -s "$verdict" ]]; then
                echo "forgepipe: $(cat "$verdict")" >&2
                (( rc != 0 )) || rc=1
                FP_WARNED=0  # a network failure, not a walltime stop: no resubmission
                rm -f "$verdict"
                trap - USR1
                return "$rc"
            fi
            rm -f "$verdict"
        fi
    fi
    trap - USR1
    # After the warning any failure counts as a stop: srun's status is the highest of its tasks',
    # and the first rank to exit 85 makes srun (--kill-on-bad-exit) end the others, so it is often
    # 143 (SIGTERM), or 138 for a rank still starting up. Every rank exits only after the
    # checkpoint is complete, and a resumed job starts from the last complete one in any case.
    # A warning that came as the run was exiting, after it finished, is not a stop.
    if (( rc != FORGEPIPE_EXIT_REQUEUE )) && fp_newer_than "$started" "$run_file"; then
        FP_WARNED=0
    fi
    if (( rc == FORGEPIPE_EXIT_REQUEUE || (FP_WARNED && rc != 0) )); then
        echo "forgepipe: the run stopped before the end (exit $rc); its last checkpoint is in $OUTPUT_DIR"
        if [[ -z "${SLURM_JOB_ID:-}" ]]; then
            echo "forgepipe: run the same command again to continue (--resume auto)"
        elif ! fp_newer_than "$started" "$OUTPUT_DIR"/checkpoints/latest "$OUTPUT_DIR"/*/checkpoints/latest; then
            # Stopped before its first checkpoint: the next job would do the same, and so on.
            echo "forgepipe: not resubmitting: this job wrote no checkpoint before the warning; give it a longer WALLTIME or a shorter FORGEPIPE_SIGNAL_LEAD" >&2
        else
            fp_resubmit "$stage" "$@"
        fi
        rc=$FORGEPIPE_EXIT_REQUEUE  # the job's own status: stopped, to be continued
    fi
    return "$rc"
}

# --- RCCL's libfabric plugin: loaded, or the job stops with the cause -----------------------------
# On a multi-node GPU job NCCL_NET=OFI makes RCCL fail rather than fall back to TCP sockets when the
# plugin does not load, but some failures hang instead (a libfabric without the CXI provider, a
# stuck provider start). env.sh turns on RCCL's INIT and NET lines (NCCL_DEBUG=INFO) and
# fp_ofi_watch reads them as they come: these lines decide (any rank's):
#   "NET/Plugin: Loaded net plugin ..."             the plugin library loaded (by name, not yet used)
#   "NET/OFI Selected provider is cxi ..."          aws-ofi-nccl found Slingshot's CXI provider
#   "Using network OFI"                             RCCL uses the plugin: the proof, printed once
#   "Error: network OFI not found", "Failed to initialize any NET plugin",
#   "Using network <other>", a provider other than FORGEPIPE_OFI_PROVIDER, or no "Using network"
#   line FORGEPIPE_OFI_TIMEOUT seconds after RCCL's first line: the step is stopped, and the cause
#   (with the last plugin or libfabric complaint seen, e.g. "NET/Plugin: Could not find: ...") is
#   written to VERDICT_FILE for fp_launch to report.
fp_ofi_watch_wanted() {
    [[ "$FORGEPIPE_SITE" == frontier && "$FORGEPIPE_DEVICE" == gpu && "${NCCL_NET:-}" == OFI && "$FORGEPIPE_OFI_CHECK" == 1 ]]
}

fp_ofi_watch() {  # fp_ofi_watch STEP_PID VERDICT_FILE < srun's output
    local step="$1" verdict="$2" line="" partial="" rc first=-1 state=watching hint="" cause="" provider
    while :; do
        rc=0
        IFS= read -r -t 5 line || rc=$?
        if (( rc > 128 )); then  # no complete line for 5 s
            partial+="$line"
            line=""
        elif (( rc != 0 )); then  # end of output
            [[ -n "$partial$line" ]] && printf '%s\n' "$partial$line"
            break
        else
            line="$partial$line"
            partial=""
            printf '%s\n' "$line"
        fi
        if [[ "$state" == watching ]]; then
            if [[ "$line" == *"NCCL INFO"* || "$line" == *"NCCL WARN"* ]] && (( first < 0 )); then first=$SECONDS; fi
            case "$line" in
                *"NET/Plugin"*"Could not find"* | *"NET/Plugin"*"load returned"* | *"NET/Plugin"*"Failed to find ncclNetPlugin"* | *"NET/OFI"*WARN* | *WARN*"NET/OFI"*)
                    hint="${line##*NCCL }" ;;
            esac
            if [[ "$line" == *"Using network OFI"* ]]; then
                state=ok
                echo "forgepipe: RCCL is using its libfabric (OFI) plugin: ${line##*NCCL INFO }"
            elif [[ "$line" =~ [Ss]elected\ [Pp]rovider\ is\ ([A-Za-z0-9_\;]+) ]]; then
                provider="${BASH_REMATCH[1]}"
                if [[ "$provider" != "$FORGEPIPE_OFI_PROVIDER" ]]; then
                    cause="libfabric gave RCCL's plugin the '$provider' provider, not '$FORGEPIPE_OFI_PROVIDER': the host's Cray libfabric is not first on the container's library path (FORGEPIPE_LIBFABRIC_DIR='$FORGEPIPE_LIBFABRIC_DIR')"
                fi
            elif [[ "$line" == *"Error: network OFI not found"* || "$line" == *"Failed to initialize any NET plugin"* ]]; then
                cause="RCCL's libfabric (OFI) network plugin did not load or start (NCCL_NET_PLUGIN=$FORGEPIPE_NCCL_NET_PLUGIN in the container; host libfabric '$FORGEPIPE_LIBFABRIC_DIR')"
            elif [[ "$line" =~ Using\ network\ ([A-Za-z0-9_]+) ]]; then
                cause="RCCL is using the '${BASH_REMATCH[1]}' network, not its libfabric (OFI) plugin"
            elif (( first >= 0 && SECONDS - first >= FORGEPIPE_OFI_TIMEOUT )); then
                cause="RCCL started ${FORGEPIPE_OFI_TIMEOUT}s ago and has not chosen a network: the libfabric plugin is stuck (FORGEPIPE_OFI_TIMEOUT)"
            fi
            if [[ -n "$cause" ]]; then
                state=failed
                echo "multi-node run stopped: $cause${hint:+; last plugin message: $hint}. See README 'First run on Frontier'." > "$verdict"
                kill -TERM "$step" 2>/dev/null || true
            fi
        fi
    done
    return 0
}

fp_newer_than() {  # fp_newer_than EPOCH FILE...: was any of the files written at or after EPOCH?
    local since="$1" f
    shift
    for f in "$@"; do
        if [[ -f "$f" ]] && (( $(stat -c %Y "$f") >= since )); then return 0; fi
    done
    return 1
}
