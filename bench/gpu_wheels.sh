#!/usr/bin/env bash
# Fetch the wheels that `make gpu-check` installs on a GPU machine without a package index
# (CPython 3.12, x86-64 Linux), into DIR (default .whl/). Run where pip reaches an index.
#   bench/gpu_wheels.sh [DIR] [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
pyver=${2:-3.12}
mkdir -p "$dir"
pin() {  # the version of $1 in the one pin file
    grep -iE "^$1==" requirements/constraints.txt | head -n1
}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
while read -r spec; do
    case "$spec" in ''|'#'*) continue ;; esac
    [[ "$spec" == *==* ]] || spec=$(pin "$spec")
    if [[ "$spec" == deepspeed==* ]]; then
        # DeepSpeed ships a source distribution only; its wheel is pure Python (ops JIT-build on the GPU).
        DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$spec"
    else
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
            "${platforms[@]}" -d "$dir" "$spec"
    fi
done < bench/gpu-wheels.txt
du -sh "$dir"
