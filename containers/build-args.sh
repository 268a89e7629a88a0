#!/usr/bin/env bash
# Print containers/versions.env as resolved `--build-arg KEY=VALUE` words, one per line, for
# `docker build` and `apptainer build` (neither reads a shell env file itself).
# Usage: containers/build-args.sh [path/to/versions.env]
set -euo pipefail

pins="${1:-$(dirname "${BASH_SOURCE[0]}")/versions.env}"
[[ -f "$pins" ]] || { echo "build-args.sh: no pin file at $pins" >&2; exit 1; }

# shellcheck source=/dev/null
set -a && . "$pins" && set +a
while IFS= read -r key; do
    printf -- '--build-arg\n%s=%s\n' "$key" "${!key}"
done < <(sed -n 's/^\([A-Z][A-Z0-9_]*\)=.*/\1/p' "$pins")
