"""Wrap a model in a DeepSpeed engine: parameter groups, the LR schedule, initialize."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)

NO_DECAY = ("bias", "norm", "layernorm", "ln_f")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def zero3_loading(ds_config: dict) -> Iterator[None]:
    """Models built inside load straight into ZeRO-3 partitions (transformers' DeepSpeed
    integration wraps from_pretrained in deepspeed.zero.Init), so no rank ever holds a whole
    copy: 8 ranks of a Frontier node loading forge-l (25.6B, bf16) in full would need ~410 GB
    of its 512 GB. Outside stage 3 it does nothing. Collective: every rank builds the model."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def parameter_count(model: torch.nn.Module) -> int:
    """All parameters, counted whole even when ZeRO-3 has partitioned them (ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def train_flops_per_token(model: torch.nn.Module) -> float:
    """Forward + backward matmul FLOPs per token, the usual 6N estimate (attention not counted)."""
    return 6.0 * parameter_count(model)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if any(key in name.lower() for key in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def initialize(model: torch.nn.Module, ds_config: dict, *, weight_decay: float = 0.0, total_steps: int = 0,
               warmup_ratio: float = 0.0, min_lr_ratio: float = 1.0):
    """A training engine (optimizer from the JSON, warm-up + cosine schedule), or, when the JSON
    has no optimizer, an inference engine for a frozen model."""
    import deepspeed

    log.debug("DeepSpeed config: %s", json.dumps(ds_config))
    if "optimizer" not in ds_config:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return engine
    warmup = int(warmup_ratio * total_steps)
    schedule = partial(lr_factor, total_steps=total_steps, warmup_steps=warmup, min_ratio=min_lr_ratio)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
    )
    return engine
