#!/usr/bin/env bash
# Print the digest (sha256:...) an image tag points to in its registry now, one line on stdout:
#
#   containers/resolve-digest.sh IMAGE:TAG
#
# Asks the first registry client found that answers, in this order: skopeo, crane, regctl,
# docker buildx imagetools, and curl against Docker Hub's registry API (Docker Hub names only; the
# base images are there). Nothing is pulled. The digest is the tag's top-level manifest (the
# multi-platform index where there is one): `FROM repo@<digest>` then pulls what the tag pulls.
# Exit 1 with one line on stderr when no client is here or none could answer.
# FORGEPIPE_DIGEST_TOOLS (the clients to try, in order) and FORGEPIPE_DIGEST_TIMEOUT (seconds per
# client, 60) are for tests and slow links.
set -euo pipefail

image="${1:?usage: resolve-digest.sh IMAGE:TAG}"
tools="${FORGEPIPE_DIGEST_TOOLS-skopeo crane regctl docker curl}"
limit="${FORGEPIPE_DIGEST_TIMEOUT:-60}"

# IMAGE split for Docker Hub's API: HUB_REPO (library/ for official images; empty for an image in
# another registry) and HUB_TAG.
hub_name() {
    local ref="$1" last first
    HUB_TAG=latest
    last="${ref##*/}"
    if [[ "$last" == *:* ]]; then HUB_TAG="${last##*:}"; ref="${ref%:*}"; fi
    first="${ref%%/*}"
    if [[ "$ref" == */* && ( "$first" == *.* || "$first" == *:* || "$first" == localhost ) ]]; then
        case "$first" in
            docker.io | index.docker.io | registry-1.docker.io) ref="${ref#*/}" ;;
            *) HUB_REPO=""; return 0 ;;
        esac
    fi
    [[ "$ref" == */* ]] || ref="library/$ref"
    HUB_REPO="$ref"
}

ask() {  # ask TOOL: the digest on stdout, or a reason on stderr and status 1
    local tool="$1" token
    case "$tool" in
        skopeo) timeout "$limit" skopeo inspect --format '{{.Digest}}' "docker://$image" ;;
        crane) timeout "$limit" crane digest "$image" ;;
        regctl) timeout "$limit" regctl image digest "$image" ;;
        docker)
            docker buildx version >/dev/null 2>&1 || { echo "docker without buildx" >&2; return 1; }
            timeout "$limit" docker buildx imagetools inspect "$image" | sed -n 's/^Digest:[[:space:]]*//p' | head -n 1
            ;;
        curl)
            hub_name "$image"
            [[ -n "$HUB_REPO" ]] || { echo "curl asks Docker Hub only; $image is elsewhere" >&2; return 1; }
            token="$(curl -fsS --max-time "$limit" \
                "https://auth.docker.io/token?service=registry.docker.io&scope=repository:$HUB_REPO:pull")" || return 1
            token="$(sed -n 's/.*"token"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' <<< "$token")"
            [[ -n "$token" ]] || { echo "no token from auth.docker.io" >&2; return 1; }
            curl -fsSI --max-time "$limit" -H "Authorization: Bearer $token" \
                -H "Accept: application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json" \
                "https://registry-1.docker.io/v2/$HUB_REPO/manifests/$HUB_TAG" \
                | tr -d '\r' | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest:[[:space:]]*//p'
            ;;
        *) echo "unknown client" >&2; return 1 ;;
    esac
}

found=()
why=""
for tool in $tools; do
    command -v "$tool" >/dev/null 2>&1 || continue
    found+=("$tool")
    err="$(mktemp)"
    digest="$(ask "$tool" 2>"$err")" || true
    reason="$(grep -v '^[[:space:]]*$' "$err" | tail -n 1 || true)"
    rm -f "$err"
    if [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
        echo "$digest"
        exit 0
    fi
    why+="${why:+; }$tool: ${reason:-no digest in its answer}"
done
if (( ${#found[@]} == 0 )); then
    echo "resolve-digest.sh: no registry client here (looked for: ${tools:-nothing}): cannot look up $image; install skopeo, crane or docker buildx, or pin the digest by hand" >&2
else
    echo "resolve-digest.sh: cannot resolve $image (registry unreachable or tag unknown: $why)" >&2
fi
exit 1
