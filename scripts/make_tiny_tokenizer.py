"""Train the tiny byte-level BPE tokenizer shipped in forgepipe/assets/tiny-gpt-neox.

Tests and the demo need a tokenizer without a model hub. This one is shaped like GPT-NeoX-20B's
(byte-level BPE, "<|endoftext|>" as bos/eos/unk, "<|padding|>" in the vocabulary, no pad token
in tokenizer_config.json) but has ~1000 tokens, learnt from synthetic science/HPC English that
this script generates from a fixed seed, so re-running it reproduces the shipped files.

    python scripts/make_tiny_tokenizer.py [OUT_DIR]   # default: forgepipe/assets/tiny-gpt-neox
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1000
SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]  # ids 0 and 1, as in GPT-NeoX-20B
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "forgepipe" / "assets" / "tiny-gpt-neox"

SUBJECTS = [
    "the simulation", "the supercomputer", "the neutron source", "the catalyst", "the alloy",
    "the protein", "the reactor core", "the climate model", "the language model", "the GPU kernel",
    "the solver", "the detector", "the polymer", "the plasma", "the genome", "the battery cathode",
    "the training run", "the scheduler", "the file system", "the interconnect",
]
VERBS = [
    "reduces", "increases", "measures", "predicts", "accelerates", "stabilizes", "simulates",
    "improves", "limits", "doubles", "explains", "controls", "scales", "computes", "absorbs",
]
OBJECTS = [
    "the energy barrier", "the thermal conductivity", "the reaction rate", "the memory bandwidth",
    "the communication overhead", "the band gap", "the binding affinity", "the validation loss",
    "the diffusion coefficient", "the time to solution", "the yield strength", "the error rate",
    "the phase transition", "the throughput per node", "the quantum efficiency", "the gradient norm",
]
CLAUSES = [
    "at high temperature", "on eight GPUs per node", "with mixed precision", "under pressure",
    "across nine thousand nodes", "in the presence of water", "after one thousand steps",
    "when the batch size doubles", "with ZeRO stage three", "at exascale", "in the magnetic field",
    "by a factor of two", "for every experiment", "without loss of accuracy", "during the night",
]
QUESTIONS = [
    "Why does {s} matter?", "How can we measure {o}?", "What limits {o} {c}?",
    "Explain how {s} {v} {o}.", "Summarize the result for {o}.",
]


def synthetic_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic sentences and short Q/A dialogues about science and HPC."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        s, v, o, c = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(CLAUSES)
        sentence = f"{s.capitalize()} {v} {o} {c}."
        if i % 3 == 0:
            question = rng.choice(QUESTIONS).format(s=s, v=v, o=o, c=c)
            lines.append(f"\n\nHuman: {question}\n\nAssistant: {sentence}")
        else:
            number = f" We observed {rng.randint(1, 9999)} events in {rng.randint(2, 64)} hours."
            lines.append(sentence + number)
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE,
                    special_tokens: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def write_tokenizer(out_dir: Path, tok: Tokenizer, tokenizer_class: str = "GPTNeoXTokenizer") -> None:
    """tokenizer.json + tokenizer_config.json, with no pad token (as real GPT-NeoX exports)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "model_max_length": 512,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str]) -> None:
    out_dir = Path(argv[0]) if argv else DEFAULT_OUT
    tok = train_tokenizer(synthetic_corpus())
    write_tokenizer(out_dir, tok)
    print(f"wrote {out_dir} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main(sys.argv[1:])
