#!/usr/bin/env bash
# Print containers/versions.env as resolved `--build-arg KEY=VALUE` words, one per line, for
# `docker build` and `apptainer build` (neither reads a shell env file itself).
#
#   containers/build-args.sh [--recipe FILE] [path/to/versions.env]
#
# With --recipe, only the keys that recipe declares (a Dockerfile's `ARG KEY` lines, an Apptainer
# def file's double-brace placeholders): Apptainer refuses passed keys a def file does not use, and
# each recipe takes only its share of the one pin file. A key the recipe declares that is neither
# a pin nor FORGEPIPE_GIT_COMMIT (the commit being built, from git) is an error.
# Refuses (exit 1, naming the key) while a *_DIGEST pin the output carries is not a real
# sha256 digest: the base images are pulled by digest, never by a tag that can move.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
recipe=""
if [[ "${1:-}" == --recipe ]]; then
    recipe="${2:?build-args.sh: --recipe needs a file}"
    shift 2
fi
pins="${1:-$here/versions.env}"
[[ -f "$pins" ]] || { echo "build-args.sh: no pin file at $pins" >&2; exit 1; }

mapfile -t keys < <(sed -n 's/^\([A-Z][A-Z0-9_]*\)=.*/\1/p' "$pins")
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

for key in "${keys[@]}"; do
    value="${!key}"
    if [[ ( "$key" == *_DIGEST || "$value" == *sha256:* ) && ! "$value" =~ sha256:[0-9a-f]{64}$ ]]; then
        pin="$key"
        [[ "$key" == *_DIGEST ]] || pin="${key%_REF}_DIGEST"
        echo "build-args.sh: $pin in $pins is not a pinned digest ($key=$value); look it up (docker buildx imagetools inspect <image:tag>, or skopeo inspect docker://<image:tag>) and write the sha256:... there" >&2
        exit 1
    fi
done
for key in "${keys[@]}"; do
    printf -- '--build-arg\n%s=%s\n' "$key" "${!key}"
done
