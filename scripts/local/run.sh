#!/usr/bin/env bash
# Run a forgepipe stage in the project's image with Docker on a workstation: the same image recipe
# pins, the same environment file (scripts/frontier/env.sh, FORGEPIPE_SITE=local) and the same bind
# rules as the Frontier jobs, on the local AMD or NVIDIA GPUs.
#
#   scripts/local/run.sh [--gpu amd|nvidia|none] [--gpus N] [--image TAG] [--dry-run] STAGE [forgepipe options...]
#
# STAGE: sft | reward | ppo | pipeline; the options go to `forgepipe STAGE` unchanged, e.g.
#   scripts/local/run.sh sft --model forge-s --data data/pairs.jsonl --output-dir runs/sft
# --gpu: amd (default; /dev/kfd, /dev/dri, video/render groups; image forgepipe:rocm), nvidia
#   (--gpus all; image forgepipe:cuda, built from containers/Dockerfile.cuda), none (CPU).
# --gpus N: ranks, one per GPU (default: the GPUs found, else 1). N > 1 starts them with forgepipe's
#   launcher in the container (python -m forgepipe.launch; torchrun's variables, as srun's on Frontier):
#   a stop signal (docker stop, Ctrl-C) reaches every rank, and the exit status is the ranks' own
#   (85 when they stopped with a checkpoint; torchrun itself ended with 1 and a traceback).
# --image: the image (default forgepipe:rocm or forgepipe:cuda; FORGEPIPE_DOCKER_IMAGE).
# --dry-run: print the docker command and create nothing.
# Settings: FORGEPIPE_BINDS (more host dirs, comma-separated), FORGEPIPE_MODEL_ROOT and
# FORGEPIPE_CATALOG (catalog models, bound and passed), FORGEPIPE_SHM_SIZE (16g), DOCKER (docker).
set -euo pipefail

usage() { sed -n '2,21s/^# \{0,1\}//p' "$0"; }

gpu="${FORGEPIPE_GPU:-amd}"
gpus="${FORGEPIPE_LOCAL_GPUS:-}"
image="${FORGEPIPE_DOCKER_IMAGE:-}"
dry_run=0
while (( $# )); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --gpu) gpu="${2:?--gpu needs amd, nvidia or none}"; shift 2 ;;
        --gpu=*) gpu="${1#*=}"; shift ;;
        --gpus) gpus="${2:?--gpus needs a number}"; shift 2 ;;
        --gpus=*) gpus="${1#*=}"; shift ;;
        --image) image="${2:?--image needs a tag}"; shift 2 ;;
        --image=*) image="${1#*=}"; shift ;;
        --dry-run) dry_run=1; shift ;;
        -*) echo "run.sh: unknown option $1 (before the stage; forgepipe's options go after it)" >&2; exit 2 ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
stage="$1"
shift
case "$stage" in sft | reward | ppo | dpo | pipeline) ;; *) echo "run.sh: unknown stage '$stage' (sft, reward, ppo, dpo or pipeline)" >&2; exit 2 ;; esac
case "$gpu" in
    amd) : "${image:=forgepipe:rocm}" ;;
    nvidia) : "${image:=forgepipe:cuda}" ;;
    none) : "${image:=forgepipe:rocm}" ;;
    *) echo "run.sh: --gpu '$gpu' is not amd, nvidia or none" >&2; exit 2 ;;
esac

# The shared environment file and bind rules.
export FORGEPIPE_SITE=local FORGEPIPE_LAUNCHER=docker
FORGEPIPE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export FORGEPIPE_ROOT
# shellcheck source=scripts/frontier/launch.sh
. "$FORGEPIPE_ROOT/scripts/frontier/launch.sh"

count_gpus() {
    case "$gpu" in
        nvidia) if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; fi ;;
        amd) if [[ -d /sys/class/kfd/kfd/topology/nodes ]]; then
                 grep -l '^simd_count [1-9]' /sys/class/kfd/kfd/topology/nodes/*/properties 2>/dev/null | wc -l
             fi ;;
    esac
}
if [[ -z "$gpus" ]]; then
    gpus="$(count_gpus)"
    [[ "$gpus" =~ ^[1-9][0-9]*$ ]] || gpus=1
fi
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --gpus '$gpus' is not a positive number" >&2; exit 2; }

docker="${DOCKER:-docker}"
cmd=("$docker" run --rm --init --ipc=host "--shm-size=${FORGEPIPE_SHM_SIZE:-16g}")
case "$gpu" in
    amd)
        cmd+=(--device=/dev/kfd --device=/dev/dri --group-add video)
        # /dev/dri/renderD* belong to `render` on newer distributions; by number, which the image may not know.
        if render_gid="$(getent group render 2>/dev/null | cut -d: -f3)" && [[ -n "$render_gid" ]]; then
            cmd+=(--group-add "$render_gid")
        fi ;;
    nvidia) cmd+=(--gpus all) ;;
esac
# Files the stage writes belong to the user, not root; HOME is then the container's writable /tmp.
cmd+=(--user "$(id -u):$(id -g)" -e HOME=/tmp)

# The environment file's settings, by value so that the printed command can be pasted.
for var in $FORGEPIPE_CONTAINER_ENV; do cmd+=(-e "$var=${!var}"); done
# What the MLflow run records: the image (tag and, when Docker knows it, its id) and the GPU kind.
image_id=""
if (( ! dry_run )) && command -v "$docker" >/dev/null; then
    image_id="$("$docker" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
fi
cmd+=(-e "FORGEPIPE_IMAGE=$image${image_id:+@$image_id}" -e "FORGEPIPE_GPU_KIND=$gpu")

# Binds: the working directory (relative paths work as given), the Hugging Face cache, and every
# directory the stage reads or writes, at the same path inside as outside.
fp_binds "$stage" "$@"
binds=("$(fp_path "$PWD")" "$HF_HOME" "${FP_BINDS[@]}")
mkdirs=("$HF_HOME" "${FP_MKDIRS[@]}")
seen=","
for dir in "${binds[@]}"; do
    [[ "$seen" == *",$dir,"* ]] && continue
    seen+="$dir,"
    cmd+=(-v "$dir:$dir")
done
cmd+=(-w "$(fp_path "$PWD")")

# One rank per GPU: forgepipe's launcher in the container (RANK/LOCAL_RANK/WORLD_SIZE as torchrun sets
# them); it passes a stop signal to the ranks and ends with their status, 85 after a stop checkpoint.
if (( gpus > 1 )); then
    cmd+=(--entrypoint python "$image" -m forgepipe.launch --nproc-per-node "$gpus" "$stage" "$@")
else
    cmd+=("$image" "$stage" "$@")
fi

if (( dry_run )); then
    fp_print_cmd "${cmd[@]}"
    echo "# paths the run reads and writes, from $FP_PATHS_FROM:"
    for line in "${FP_PATHS[@]}"; do echo "#   $line"; done
    for dir in "${mkdirs[@]}"; do [[ -d "$dir" ]] || echo "# created before the run: $dir"; done
    exit 0
fi
mkdir -p "${mkdirs[@]}"
exec "${cmd[@]}"
