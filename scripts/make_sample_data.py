#!/usr/bin/env python3
"""Write the small synthetic sample bundled in examples/data/ (deterministic: same seed, same bytes).

    python scripts/make_sample_data.py [--out examples/data] [--seed 0]

sample_pairs.jsonl: {prompt, chosen, rejected} in HH dialogue style about science/HPC topics; the
chosen answer is helpful and correct, the rejected one unhelpful or wrong.
sample_docs.jsonl: {text} short documentation paragraphs (PPO's unsupervised term, SFT on text).
All content is templated here; none comes from a real data set.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (topic, a correct one-sentence explanation, a practical tip)
TOPICS = [
    ("MPI", "MPI is a message-passing standard that lets processes on different nodes exchange data explicitly.",
     "Start with point-to-point sends and receives, then move to collectives such as allreduce."),
    ("an allreduce", "An allreduce combines a value from every rank, for example by summing, and gives every rank the result.",
     "Data-parallel training uses an allreduce to average gradients after each backward pass."),
    ("ZeRO stage 3", "ZeRO stage 3 partitions parameters, gradients and optimizer states across data-parallel ranks.",
     "It lets a model larger than one GPU's memory train, at the cost of gathering parameters on the fly."),
    ("gradient accumulation", "Gradient accumulation sums gradients over several micro-batches before one optimizer step.",
     "It raises the effective batch size without raising memory use."),
    ("mixed precision", "Mixed precision runs most maths in bf16 or fp16 while keeping master weights in fp32.",
     "On recent accelerators bf16 avoids the loss scaling that fp16 needs."),
    ("Slurm", "Slurm is a batch scheduler that allocates nodes to jobs and launches tasks with srun.",
     "Ask for whole nodes and one task per GPU for distributed training."),
    ("a checkpoint", "A checkpoint saves model weights, optimizer state and progress so a job can resume.",
     "Write checkpoints to a temporary name and rename them when complete so a crash never leaves half a file."),
    ("the roofline model", "The roofline model bounds performance by peak compute and by memory bandwidth times arithmetic intensity.",
     "Kernels left of the ridge point are memory bound and gain little from more FLOPs."),
    ("weak scaling", "Weak scaling grows the problem with the number of processors and asks whether time per step stays flat.",
     "Report it together with strong scaling, which keeps the problem fixed."),
    ("strong scaling", "Strong scaling keeps the problem size fixed and measures how the run time drops as processors are added.",
     "Amdahl's law limits it by the serial fraction of the code."),
    ("Amdahl's law", "Amdahl's law says the speed-up of a fixed problem is limited by the part that cannot run in parallel.",
     "A code that is 5 percent serial can never run more than 20 times faster."),
    ("a GPU kernel", "A GPU kernel is a function launched over many threads that run the same code on different data.",
     "Keep memory accesses coalesced so neighbouring threads read neighbouring addresses."),
    ("the Lustre file system", "Lustre is a parallel file system that stripes files over many storage targets.",
     "Avoid millions of tiny files; pack data into a few large ones."),
    ("InfiniBand and Slingshot", "They are high-speed interconnects that give nodes low-latency, high-bandwidth links.",
     "Collective performance across nodes depends on them far more than on the GPUs."),
    ("a tokenizer", "A tokenizer maps text to integer ids from a fixed vocabulary, often with byte-pair encoding.",
     "Always train and serve a model with the same tokenizer."),
    ("a reward model", "A reward model scores a response to a prompt and is trained on pairs where one answer is preferred.",
     "Its loss pushes the score of the chosen answer above the score of the rejected one."),
    ("PPO", "PPO is a policy-gradient method that limits each update with a clipped probability ratio.",
     "In RLHF a KL penalty to a reference model keeps the policy from drifting too far."),
    ("supervised fine-tuning", "Supervised fine-tuning trains a pretrained model on prompt and response pairs with loss on the response.",
     "Mask the prompt tokens so the model learns to answer rather than to repeat questions."),
    ("the learning rate warmup", "Warmup raises the learning rate from near zero over the first steps of training.",
     "It avoids large, unstable updates while optimizer statistics are still poor."),
    ("a cosine schedule", "A cosine schedule lowers the learning rate along half a cosine wave from its peak to a floor.",
     "Pair it with a short warmup and a floor of about a tenth of the peak."),
    ("the Fourier transform", "The Fourier transform writes a signal as a sum of sinusoids of different frequencies.",
     "The FFT computes it in n log n time, which makes spectral methods practical."),
    ("the finite element method", "The finite element method splits a domain into small elements and solves for values at their nodes.",
     "Refine the mesh where the solution changes quickly."),
    ("molecular dynamics", "Molecular dynamics integrates Newton's equations for atoms under a force field.",
     "The time step must resolve the fastest vibration, often about a femtosecond."),
    ("a climate model", "A climate model solves the equations of atmosphere, ocean and ice on a global grid.",
     "Ensembles of runs estimate the uncertainty of a projection."),
    ("entropy", "Entropy measures how many microscopic states are consistent with a macroscopic state.",
     "In an isolated system it never decreases."),
    ("photosynthesis", "Photosynthesis uses light energy to turn carbon dioxide and water into sugar and oxygen.",
     "Chlorophyll absorbs mostly red and blue light, which is why leaves look green."),
    ("DNA replication", "DNA replication copies a double helix by using each strand as a template for a new one.",
     "Polymerases proofread as they go, which keeps the error rate very low."),
    ("a neural network", "A neural network composes linear maps and nonlinear functions whose weights are learned by gradient descent.",
     "Start small and check that it can overfit a tiny batch before scaling up."),
    ("a container image", "A container image packs an application with its libraries so it runs the same on every machine.",
     "Pin every version in one place so rebuilding the image gives the same software."),
    ("MLflow tracking", "MLflow tracking records the parameters, metrics and artifacts of each run.",
     "Log the exact configuration so any result can be traced back to how it was made."),
]

QUESTIONS = [
    "What is {t}?",
    "Can you explain {t} in simple terms?",
    "Why does {t} matter?",
    "I am new to this. How should I think about {t}?",
    "Give me a short summary of {t}.",
    "My advisor mentioned {t}. What does it mean?",
    "Is there a practical tip about {t}?",
    "How would you describe {t} to a colleague?",
    "What should a student know about {t}?",
    "Could you help me understand {t}?",
]

OPENERS = [
    "I'm setting up my first research project on a supercomputer.",
    "I'm reading a paper for my group meeting.",
    "I'm preparing a tutorial for new students.",
]

UNHELPFUL = [
    "I don't know.",
    "That is not something I can help with.",
    "Just search for it online.",
    "It is not important, you can ignore it.",
    "Why do you want to know?",
    "{T} is a kind of coffee machine used in labs.",
    "Nobody really understands {t}, so don't bother.",
    "{T} only matters on computers from the 1970s.",
]


def capital(text: str) -> str:
    return text[0].upper() + text[1:]


def make_pairs(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for topic, explanation, tip in TOPICS:
        for k, question in enumerate(QUESTIONS):
            q = question.format(t=topic)
            if k % 3 == 2:  # some multi-turn dialogues
                opener = rng.choice(OPENERS)
                prompt = (f"\n\nHuman: {opener}\n\nAssistant: Happy to help. What would you like to know?"
                          f"\n\nHuman: {q}\n\nAssistant:")
            else:
                prompt = f"\n\nHuman: {q}\n\nAssistant:"
            chosen = f" {explanation} {tip}" if k % 2 else f" {explanation}"
            rejected = " " + rng.choice(UNHELPFUL).format(t=topic, T=capital(topic))
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows


def make_docs(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for topic, explanation, tip in TOPICS:
        rows.append({"text": f"{capital(topic)}. {explanation} {tip}"})
        other = rng.choice([t for t in TOPICS if t[0] != topic])
        rows.append({"text": f"Notes on {topic}. {tip} See also {other[0]}: {other[1]}"})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "examples" / "data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write_jsonl(out / "sample_pairs.jsonl", make_pairs(rng))
    write_jsonl(out / "sample_docs.jsonl", make_docs(rng))


if __name__ == "__main__":
    main()
