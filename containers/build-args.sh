#!/usr/bin/env bash
# Print containers/versions.env as resolved `--build-arg KEY=VALUE` words, one per line, for
# `docker build` and `apptainer build` (neither reads a shell env file itself).
#
#   containers/build-args.sh [--recipe FILE] [--lock FILE] [path/to/versions.env]
#
# With --recipe, only the keys that recipe declares (a Dockerfile's `ARG KEY` lines, an Apptainer
# def file's double-brace placeholders): Apptainer refuses passed keys a def file does not use, and
# each recipe takes only its share of the one pin file. A key the recipe declares that is neither
# a pin nor FORGEPIPE_GIT_COMMIT (the commit being built, from git) is an error.
#
# Base images (each <NAME>_DIGEST with its <NAME> tag, <NAME>_REPO and <NAME>_REF):
# - sha256:<64 hex>: pinned; pulled by that digest.
# - empty: not pinned. The tag is resolved to its digest now (containers/resolve-digest.sh, or the
#   command in FORGEPIPE_DIGEST_RESOLVER) and the build pulls that digest; with no registry client,
#   the build pulls the tag and <NAME>_DIGEST says `unresolved`. One line on stderr says which.
#   STRICT_PINS=1 refuses (exit 1, naming the pin) instead.
# - anything else (a placeholder, a truncated digest, a tag): refused, exit 1, naming the key.
# The digest handed to the build is what the image records (labels, FORGEPIPE_BASE_IMAGE_DIGEST, so
# the MLflow tags of its runs); --lock FILE also writes every KEY=VALUE handed to the recipe there
# (`make sif`/`make docker`: containers/versions.lock, which the image then carries).
#
# ROCM_ARCH (e.g. gfx942, gfx1100, or gfx90a;gfx942): the GPU architecture(s) DeepSpeed's ROCm ops
# are built for instead of versions.env's PYTORCH_ROCM_ARCH, with ROCM_WAVEFRONT_SIZE to match
# (64 for gfx9 (CDNA), 32 for gfx10-12 (RDNA); a list mixing the two is refused).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
recipe=""
lock=""
while [[ "${1:-}" == --recipe || "${1:-}" == --lock ]]; do
    if [[ "$1" == --recipe ]]; then recipe="${2:?build-args.sh: --recipe needs a file}"; else lock="${2:?build-args.sh: --lock needs a file}"; fi
    shift 2
done
pins="${1:-$here/versions.env}"
[[ -f "$pins" ]] || { echo "build-args.sh: no pin file at $pins" >&2; exit 1; }

mapfile -t keys < <(sed -n 's/^\([A-Z][A-Z0-9_]*\)=.*/\1/p' "$pins")
all_keys=("${keys[@]}")
# shellcheck source=/dev/null
set -a && . "$pins" && set +a
FORGEPIPE_GIT_COMMIT="$(git -C "$here" rev-parse HEAD 2>/dev/null || echo unknown)"
export FORGEPIPE_GIT_COMMIT

if [[ -n "$recipe" ]]; then
    [[ -f "$recipe" ]] || { echo "build-args.sh: no recipe at $recipe" >&2; exit 1; }
    if [[ "$recipe" == *.def ]]; then
        mapfile -t wanted < <(grep -o '{{ *[A-Za-z0-9_]* *}}' "$recipe" | tr -d '{} ' | awk '!seen[$0]++')
    else
        mapfile -t wanted < <(sed -n 's/^ARG[[:space:]]\{1,\}\([A-Za-z0-9_]\{1,\}\)[[:space:]]*$/\1/p' "$recipe" | awk '!seen[$0]++')
    fi
    for key in "${wanted[@]}"; do
        if [[ "$key" != FORGEPIPE_GIT_COMMIT && " ${keys[*]} " != *" $key "* ]]; then
            echo "build-args.sh: $recipe uses $key, which $pins does not pin" >&2
            exit 1
        fi
    done
    keys=("${wanted[@]}")
fi

# ROCM_ARCH: the ops' GPU architecture(s) and their wavefront size.
if [[ -n "${ROCM_ARCH:-}" && " ${keys[*]} " == *" PYTORCH_ROCM_ARCH "* ]]; then
    read -r -a archs <<< "${ROCM_ARCH//[;,]/ }"
    wave=""
    for arch in "${archs[@]}"; do
        case "$arch" in
            gfx9[0-9a-f][0-9a-f]) size=64 ;;
            gfx1[0-2][0-9a-f][0-9a-f]) size=32 ;;
            *) echo "build-args.sh: ROCM_ARCH: '$arch' is not an AMD GPU architecture (gfx90a, gfx942, gfx1100, ...)" >&2; exit 1 ;;
        esac
        if [[ -n "$wave" && "$wave" != "$size" ]]; then
            echo "build-args.sh: ROCM_ARCH=$ROCM_ARCH mixes wavefront sizes 64 (gfx9) and 32 (gfx10-12): DeepSpeed's ops are built for one; build one image per kind" >&2
            exit 1
        fi
        wave="$size"
    done
    # shellcheck disable=SC2034  # printed through ${!key} below
    PYTORCH_ROCM_ARCH="$(IFS=';'; echo "${archs[*]}")" ROCM_WAVEFRONT_SIZE="$wave"
fi

# Base images: pinned, resolved now, or (no registry client) the tag.
resolver="${FORGEPIPE_DIGEST_RESOLVER:-$here/resolve-digest.sh}"
done_names=" "
for key in "${keys[@]}"; do
    [[ "$key" == *_DIGEST || "$key" == *_REF ]] || continue
    name="${key%_DIGEST}"
    name="${name%_REF}"
    [[ " ${all_keys[*]} " == *" ${name}_DIGEST "* && "$done_names" != *" $name "* ]] || continue
    done_names+="$name "
    digest_key="${name}_DIGEST" ref_key="${name}_REF" repo_key="${name}_REPO"
    digest="${!digest_key}"
    if [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
        continue
    elif [[ -n "$digest" ]]; then
        echo "build-args.sh: $digest_key in $pins is not a pinned digest ($digest_key=$digest): leave it empty to build from the tag, or run 'make pin' (containers/pin.sh) to write the sha256:... there" >&2
        exit 1
    elif [[ "${STRICT_PINS:-0}" == 1 ]]; then
        echo "build-args.sh: $digest_key is not pinned in $pins and STRICT_PINS=1 refuses a build from the tag ${!name}: run 'make pin' (or write its sha256:... there)" >&2
        exit 1
    fi
    tag="${!name}"
    err="$(mktemp)"
    found=""
    if [[ "$resolver" != none ]]; then found="$("$resolver" "$tag" 2>"$err")" || found=""; fi
    reason="$(tail -n 1 "$err")"
    rm -f "$err"
    if [[ "$found" =~ ^sha256:[0-9a-f]{64}$ ]]; then
        printf -v "$digest_key" '%s' "$found"
        printf -v "$ref_key" '%s' "${!repo_key}@$found"
        echo "build-args.sh: $digest_key is not pinned: building from $tag, which is $found now (the image records it; 'make pin' writes it into $pins; STRICT_PINS=1 refuses unpinned builds)" >&2
    else
        printf -v "$digest_key" '%s' unresolved
        printf -v "$ref_key" '%s' "$tag"
        echo "build-args.sh: $digest_key is not pinned and its digest cannot be looked up here (${reason:-resolver: $resolver}): building from the tag $tag, recorded as 'unresolved'" >&2
    fi
done

if [[ -n "$lock" ]]; then
    {
        echo "# What containers/build-args.sh handed ${recipe:-the build} (from $(basename "$pins")): base"
        echo "# images by the digest pulled, 'unresolved' where no registry client could look it up."
        for key in "${keys[@]}"; do
            if [[ "${!key}" =~ ^[A-Za-z0-9_@%+=:,./-]*$ ]]; then echo "$key=${!key}"; else echo "$key='${!key}'"; fi
        done
    } > "$lock.tmp.$$"
    mv "$lock.tmp.$$" "$lock"
fi
for key in "${keys[@]}"; do
    printf -- '--build-arg\n%s=%s\n' "$key" "${!key}"
done
