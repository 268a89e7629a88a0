#!/usr/bin/env bash
# Print this machine's AMD GPU architecture(s), e.g. `gfx942` or `gfx90a;gfx1100` (distinct, in
# the order the driver lists them), or nothing when it has no AMD GPU: what `make docker` builds a
# local ROCm image's DeepSpeed ops for (ROCM_ARCH). Reads the amdgpu driver's KFD topology in sysfs
# (no ROCm install needed), else asks rocminfo.
# FORGEPIPE_KFD_TOPOLOGY replaces /sys/class/kfd/kfd/topology/nodes (tests).
set -euo pipefail

topology="${FORGEPIPE_KFD_TOPOLOGY:-/sys/class/kfd/kfd/topology/nodes}"
archs=()
add() { [[ " ${archs[*]} " == *" $1 "* ]] || archs+=("$1"); }

# gfx_target_version is major*10000 + minor*100 + stepping (0 for a CPU node): 90010 is gfx90a,
# 90402 gfx942, 110000 gfx1100.
for props in "$topology"/*/properties; do
    [[ -r "$props" ]] || continue
    version="$(sed -n 's/^gfx_target_version[[:space:]]\{1,\}\([0-9]\{1,\}\)$/\1/p' "$props")"
    if [[ -z "$version" ]] || (( version == 0 )); then continue; fi
    add "$(printf 'gfx%d%x%x' $((version / 10000)) $((version / 100 % 100)) $((version % 100)))"
done
if (( ${#archs[@]} == 0 )) && command -v rocminfo >/dev/null 2>&1; then
    while IFS= read -r arch; do add "$arch"; done \
        < <({ timeout 30 rocminfo 2>/dev/null || true; } | sed -n 's/^[[:space:]]*Name:[[:space:]]*\(gfx[0-9a-f]\{3,4\}\)[[:space:]]*$/\1/p')
fi
if (( ${#archs[@]} )); then (IFS=';'; echo "${archs[*]}"); fi
exit 0
