"""A randomly initialised FORGE-shaped GPT-NeoX for tests and the demo (no model hub needed).

The config (forgepipe/assets/tiny-gpt-neox/config.json) has FORGE's architecture (rotary,
LayerNorm, parallel residual, untied embeddings) at toy size; the tokenizer beside it is the
~1000-token byte-level BPE made by scripts/make_tiny_tokenizer.py.

    python -m forgepipe.models.tiny OUT_DIR [--seed 0] [--num-layers 2] [--hidden-size 64]
"""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, GPTNeoXForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tiny_asset_dir() -> Path:
    return Path(str(resources.files("forgepipe") / "assets" / "tiny-gpt-neox"))


def make_tiny_model(out_dir: str | Path, *, seed: int = 0, num_layers: int = 2, hidden_size: int = 64) -> Path:
    """Write a random GPTNeoXForCausalLM (safetensors) plus the tiny tokenizer to out_dir."""
    assets = tiny_asset_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(assets, local_files_only=True)
    config.num_hidden_layers = num_layers
    config.hidden_size = hidden_size
    config.intermediate_size = 4 * hidden_size
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(assets / name, out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forgepipe.models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    args = parser.parse_args(argv)
    out = make_tiny_model(args.out_dir, seed=args.seed, num_layers=args.num_layers, hidden_size=args.hidden_size)
    print(out)


if __name__ == "__main__":
    main()
