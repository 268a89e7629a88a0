#!/usr/bin/env bash
# Pin the base images: look up the digest each base image's tag points to now and write it into
# versions.env (`make pin`). Needs a registry client and the registry (containers/resolve-digest.sh:
# skopeo, crane, regctl, docker buildx imagetools, or curl for Docker Hub).
#
#   containers/pin.sh [--dry-run] [path/to/versions.env]
#
# Every <NAME>_DIGEST key is looked up from its <NAME> tag, pinned or not (re-pinning after a tag
# moved is how a base image is updated). All are looked up before anything is written: one that
# fails stops the whole (exit 1, one line, file untouched). --dry-run prints the lines only.
# FORGEPIPE_DIGEST_RESOLVER replaces the lookup command (tests).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dry=0
if [[ "${1:-}" == --dry-run ]]; then dry=1; shift; fi
pins="${1:-$here/versions.env}"
[[ -f "$pins" ]] || { echo "pin.sh: no pin file at $pins" >&2; exit 1; }
resolver="${FORGEPIPE_DIGEST_RESOLVER:-$here/resolve-digest.sh}"

mapfile -t digest_keys < <(sed -n 's/^\([A-Z][A-Z0-9_]*_DIGEST\)=.*/\1/p' "$pins")
(( ${#digest_keys[@]} )) || { echo "pin.sh: no *_DIGEST key in $pins" >&2; exit 1; }
# shellcheck source=/dev/null
. "$pins"

lines=()
for key in "${digest_keys[@]}"; do
    name="${key%_DIGEST}"
    tag="${!name:-}"
    [[ -n "$tag" ]] || { echo "pin.sh: $key has no $name tag in $pins to look up" >&2; exit 1; }
    err="$(mktemp)"
    digest="$("$resolver" "$tag" 2>"$err")" || digest=""
    reason="$(tail -n 1 "$err")"
    rm -f "$err"
    if [[ ! "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
        echo "pin.sh: nothing written: ${reason:-$resolver gave no digest for $tag}" >&2
        exit 1
    fi
    lines+=("$key=$digest")
    echo "pin.sh: $key=$digest  ($tag)"
done
(( dry )) && exit 0

tmp="$pins.tmp.$$"
cp -p "$pins" "$tmp"
for line in "${lines[@]}"; do
    sed -i "s|^${line%%=*}=.*\$|$line|" "$tmp"
done
mv "$tmp" "$pins"
echo "pin.sh: wrote ${#lines[@]} digest(s) into $pins"
