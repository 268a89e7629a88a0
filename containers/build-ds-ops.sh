#!/usr/bin/env bash
# Install DeepSpeed (version from the constraints file) with its ops compiled ahead of time for
# the machine that will run them, whatever machine builds the image, then check that every op
# asked for is installed. Run by the image recipes:
#
#   containers/build-ds-ops.sh rocm|cuda CONSTRAINTS_FILE
#
# Settings (build arguments from containers/versions.env): DS_BUILD_* (which ops), CPU_MARCH;
# rocm: PYTORCH_ROCM_ARCH, ROCM_WAVEFRONT_SIZE; cuda: TORCH_CUDA_ARCH_LIST.
#
# What goes wrong without it, on a build machine with no GPU:
# - DeepSpeed picks its CPU accelerator, records `accelerator_name = cpu` with the ops, and on a GPU
#   at run time ignores them all and compiles them again (JIT) on every node: DS_ACCELERATOR=cuda.
# - On ROCm its op builder reads the GPU architecture and the wavefront size from `rocminfo`; with
#   no GPU the wavefront size falls back to 32 (gfx90a's is 64, and ZeRO++'s quantizer kernels are
#   built around it): a rocminfo stand-in answers for PYTORCH_ROCM_ARCH during the build only.
# - Host ops get -march=native (the build CPU): march-cc compiles them for CPU_MARCH instead.
# - An op that fails to build is skipped quietly: check-ds-ops.py fails the build instead.
set -euo pipefail

flavor="${1:?usage: build-ds-ops.sh rocm|cuda CONSTRAINTS_FILE}"
constraints="${2:?usage: build-ds-ops.sh rocm|cuda CONSTRAINTS_FILE}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${CPU_MARCH:?build-ds-ops.sh: CPU_MARCH is not set (pass the build arguments)}"

work="$(mktemp -d)"
rocminfo=""  # the stand-in, while there is one
cleanup() {
    if [[ -n "$rocminfo" ]]; then
        rm -f "$rocminfo"
        if [[ -e "$work/rocminfo.real" || -L "$work/rocminfo.real" ]]; then mv "$work/rocminfo.real" "$rocminfo"; fi
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Host compilers that build for CPU_MARCH.
mkdir -p "$work/cc"
for name in cc gcc c++ g++; do
    cp "$here/march-cc" "$work/cc/$name"
done
export PATH="$work/cc:$PATH" CC="$work/cc/gcc" CXX="$work/cc/g++" CPU_MARCH

export DS_ACCELERATOR=cuda  # ROCm's torch answers as CUDA too
case "$flavor" in
    rocm)
        : "${PYTORCH_ROCM_ARCH:?build-ds-ops.sh: PYTORCH_ROCM_ARCH is not set}"
        : "${ROCM_WAVEFRONT_SIZE:?build-ds-ops.sh: ROCM_WAVEFRONT_SIZE is not set}"
        export PYTORCH_ROCM_ARCH
        # DeepSpeed's op builder runs /opt/rocm/bin/rocminfo, else the rocminfo on PATH: both answer.
        target="${FORGEPIPE_ROCMINFO:-/opt/rocm/bin/rocminfo}"
        if [[ -e "$target" || -L "$target" ]]; then mv "$target" "$work/rocminfo.real"; fi
        rocminfo="$target"
        mkdir -p "$(dirname "$rocminfo")"
        # One agent per architecture of PYTORCH_ROCM_ARCH (a ;-separated list: `make docker ROCM_ARCH=...`).
        {
            printf '#!/bin/sh\n# forgepipe build stand-in: the target GPU, not the build machine'"'"'s\n'
            for arch in ${PYTORCH_ROCM_ARCH//;/ }; do
                printf 'echo "  Name:                    %s"\necho "  Wavefront Size:          %s(0x%x)"\n' \
                    "$arch" "$ROCM_WAVEFRONT_SIZE" "$ROCM_WAVEFRONT_SIZE"
            done
        } > "$rocminfo"
        chmod +x "$rocminfo"
        mkdir -p "$work/rocm-bin" && ln -s "$rocminfo" "$work/rocm-bin/rocminfo"
        export PATH="$work/rocm-bin:$PATH"
        ;;
    cuda)
        : "${TORCH_CUDA_ARCH_LIST:?build-ds-ops.sh: TORCH_CUDA_ARCH_LIST is not set}"
        export TORCH_CUDA_ARCH_LIST
        ;;
    *) echo "build-ds-ops.sh: unknown flavor '$flavor' (rocm or cuda)" >&2; exit 2 ;;
esac

python -m pip install --no-cache-dir --no-build-isolation -c "$constraints" deepspeed
python "$here/check-ds-ops.py"
