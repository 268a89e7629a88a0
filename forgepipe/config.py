"""Typed run configuration: one source of defaults, YAML files, command-line overrides.

A run's config is a tree of dataclasses. Every key has one default, here. A YAML
file may set any subset of keys (nested, as in `resolved_dict()`); command-line
options override the file; the result is validated before anything expensive
starts and logged, flattened, to MLflow.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from forgepipe.errors import ForgeError

Stage = Literal["sft", "reward", "ppo"]
STAGES: tuple[str, ...] = ("sft", "reward", "ppo")


@dataclass
class ModelConfig:
    """Which model to train and how to adapt it."""

    name_or_path: str = ""  # a catalog name (forge-s, ...), a local directory, or a Hub name
    tokenizer: str | None = None  # defaults to the model's own
    catalog: str | None = None  # catalog YAML; default: $FORGEPIPE_CATALOG, then the bundled one
    lora_dim: int = 0  # 0 disables LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None: the architecture's linear layers
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes token batches."""

    sources: list[str] = field(default_factory=list)  # files, saved-dataset dirs, or Hub names
    split: str = "2,4,4"  # shares of each source for stages sft,reward,ppo (DeepSpeed-Chat style)
    eval_fraction: float = 0.1  # held out of each stage's share for evaluation
    max_seq_len: int = 512
    max_prompt_len: int = 256  # prompt budget (PPO generation prompts; SFT/reward left-truncation)
    packing: bool = False  # pack several short SFT samples into one sequence
    cache_dir: str | None = None  # tokenized cache; default: <output_dir>/.cache
    unsupervised_sources: list[str] = field(default_factory=list)  # {text} documents for PPO-ptx
    max_dropped_fraction: float = 0.1  # a source losing more of its rows (no format fits) is an error
    eval_max_samples: int = 2000  # held-out rows evaluated at most (0: all)


@dataclass
class TrainConfig:
    """The optimisation loop shared by every stage."""

    per_device_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 means run the epochs
    seed: int = 1234
    grad_clip: float = 1.0
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    eval_every: int = 0  # optimizer steps between evaluations; 0: only at the end
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    save_every_minutes: float = 0.0
    keep_last: int = 2  # checkpoints kept on disk
    resume: str = "auto"  # auto | never | a checkpoint directory
    peak_tflops: float = 0.0  # per-device peak for MFU (MI250X GCD bf16: 191.5, H100 SXM bf16: 989); 0: off
    dist_timeout_minutes: float = 30.0  # a collective stuck this long aborts the job instead of hanging it


@dataclass
class DeepSpeedConfig:
    """ZeRO, offload, ZeRO++ and profiler switches (see deepspeed_config.py for the JSON)."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    offload: Literal["none", "cpu"] = "none"
    zeropp: bool = False  # turns on qwZ + hpZ + qgZ together
    quantized_weights: bool | None = None  # qwZ; None follows `zeropp`
    quantized_gradients: bool | None = None  # qgZ; None follows `zeropp`
    hpz_size: int | None = None  # hpZ partition size; None: ranks per node when zeropp, else 1
    # Stage-3 knobs used by the FORGE runs.
    param_persistence_threshold: int = 10_000
    max_live_parameters: int = 30_000_000
    prefetch_bucket_size: int = 30_000_000
    allgather_bucket_size: int = 500_000_000
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    torch_adam: bool = False  # use torch's Adam instead of DeepSpeed's fused/CPU op (no JIT build)
    flops_profiler: bool = False
    profile_step: int = 2  # optimizer step at which the flops profiler reports


@dataclass
class TrackingConfig:
    """MLflow: where runs are recorded and under which names."""

    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
    experiment: str = "forgepipe"
    run_name: str | None = None
    log_checkpoints: bool = False  # copy the exported model into the artifact store


@dataclass
class RewardConfig:
    """Stage 2 specifics."""

    margin_field: str | None = None  # a numeric field of the data added as a margin to the loss


@dataclass
class PPOConfig:
    """Stage 3 specifics: the other three models and the PPO hyper-parameters."""

    reward_model: str = ""  # stage-2 export (or catalog name)
    critic_model: str | None = None  # defaults to the reward model
    critic_lr: float = 5e-6
    critic_zero_stage: Literal[0, 1, 2, 3] | None = None  # None: same as the actor
    critic_lora_dim: int = 0
    critic_gradient_checkpointing: bool = False
    ref_zero_stage: Literal[0, 1, 2, 3] | None = None
    allow_tokenizer_mismatch: bool = False
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int | None = None  # prompts per rank per experience batch
    ppo_epochs: int = 1
    kl_coef: float = 0.1
    reward_clip: float = 5.0
    policy_clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    ptx_coef: float = 0.0  # unsupervised loss coefficient (needs data.unsupervised_sources)
    ema: float = 0.0  # EMA decay of the actor for export; 0 disables
    gather_for_generation: bool = True  # gather ZeRO-3 params once per generation batch


@dataclass
class Config:
    """Everything a stage needs, in one validated tree."""

    stage: str = "sft"
    output_dir: str = ""
    overwrite: bool = False  # replace a finished (or other) run's outputs in output_dir
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the form logged as MLflow params."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------
# Building a config from a YAML file and overrides


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise a one-line error."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for candidate in non_none:
            try:
                return _coerce(value, candidate, where)
            except ForgeError as exc:
                errors.append(str(exc))
        raise ForgeError(errors[0])
    if origin is Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        choices = ", ".join(str(a) for a in args)
        raise ForgeError(f"{where}: {value!r} is not one of {choices}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ForgeError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ForgeError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ForgeError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ForgeError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ForgeError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ForgeError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(target: Any, updates: dict[str, Any], where: str) -> None:
    hints = _section_types(type(target))
    for key, value in updates.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ForgeError(f"{where}: unknown key {key!r} (known: {known})")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ForgeError(f"{where}{key}: expected a mapping, got {value!r}")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(target, key, _coerce(value, hints[key], f"{where}{key}"))


def set_dotted(cfg: Config, key: str, value: Any, label: str | None = None) -> None:
    """Set one dotted key (e.g. `deepspeed.zero_stage`) with type coercion; errors name `label`."""
    *path, name = key.split(".")
    node: Any = cfg
    for part in path:
        if not hasattr(node, part) or not dataclasses.is_dataclass(getattr(node, part)):
            raise ForgeError(f"{label or key}: unknown config key {key!r}")
        node = getattr(node, part)
    hints = _section_types(type(node))
    if name not in hints or dataclasses.is_dataclass(getattr(node, name)):
        raise ForgeError(f"{label or key}: unknown config key {key!r}")
    setattr(node, name, _coerce(value, hints[name], label or key))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ForgeError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ForgeError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ForgeError(f"{path}: expected a mapping at the top level")
    return data


def build_config(
    stage: str,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    layers: list[tuple[dict[str, Any], str]] | None = None,
) -> Config:
    """Defaults <- YAML file <- extra layers <- overrides (dotted keys; None values are skipped),
    then validate.

    `layers` are (mapping, where) pairs applied after the file (the pipeline's per-stage
    sections); `labels` maps dotted keys to the option names that errors should mention.
    """
    cfg = Config(stage=stage)
    all_layers = [(load_yaml(config_file), f"{config_file}: ")] if config_file else []
    for tree, where in all_layers + list(layers or []):
        _apply(cfg, tree, where)
        cfg.stage = stage
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        label = (labels or {}).get(key) or f"--{key.split('.')[-1].replace('_', '-')}"
        set_dotted(cfg, key, value, label)
    validate(cfg)
    return cfg


def parse_split(spec: str) -> tuple[float, float, float]:
    """'2,4,4' -> normalised shares for (sft, reward, ppo)."""
    try:
        parts = [float(p) for p in spec.split(",")]
    except ValueError:
        raise ForgeError(f"--data-split: {spec!r} is not three comma-separated numbers") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ForgeError(f"--data-split: {spec!r} must be three non-negative numbers, e.g. 2,4,4")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def validate(cfg: Config) -> None:
    """Checks that need no model, data or launcher. Raises ForgeError with one line."""
    if cfg.stage not in STAGES:
        raise ForgeError(f"unknown stage {cfg.stage!r} (known: {', '.join(STAGES)})")
    share = parse_split(cfg.data.split)[STAGES.index(cfg.stage)]
    if share == 0:
        raise ForgeError(f"--data-split: {cfg.data.split!r} leaves stage {cfg.stage} no data")
    t = cfg.train
    positive = {
        "--per-device-batch-size": t.per_device_batch_size,
        "--grad-accum": t.grad_accum,
        "--max-seq-len": cfg.data.max_seq_len,
        "--max-prompt-len": cfg.data.max_prompt_len,
        "--epochs": t.epochs,
        "--log-every": t.log_every,
        "--keep-last": t.keep_last,
    }
    for name, value in positive.items():
        if value < 1:
            raise ForgeError(f"{name}: must be at least 1, got {value}")
    for name, value in {"--max-steps": t.max_steps, "--eval-every": t.eval_every,
                        "--save-every": t.save_every, "--lora-dim": cfg.model.lora_dim}.items():
        if value < 0:
            raise ForgeError(f"{name}: must not be negative, got {value}")
    for name, value in {"--lr": t.lr, "--weight-decay": t.weight_decay, "--warmup-ratio": t.warmup_ratio,
                        "--min-lr-ratio": t.min_lr_ratio, "--eval-fraction": cfg.data.eval_fraction,
                        "--save-every-minutes": t.save_every_minutes, "--peak-tflops": t.peak_tflops,
                        "--max-dropped-fraction": cfg.data.max_dropped_fraction, "--grad-clip": t.grad_clip}.items():
        if not math.isfinite(value):
            raise ForgeError(f"{name}: must be a finite number, got {value}")
    if t.lr <= 0:
        raise ForgeError(f"--lr: must be positive, got {t.lr}")
    if not 0.0 <= cfg.data.max_dropped_fraction <= 1.0:
        raise ForgeError(f"--max-dropped-fraction: must be in [0, 1], got {cfg.data.max_dropped_fraction}")
    if cfg.data.eval_max_samples < 0:
        raise ForgeError(f"--eval-max-samples: must not be negative, got {cfg.data.eval_max_samples}")
    if not t.dist_timeout_minutes > 0:
        raise ForgeError(f"--dist-timeout-minutes: must be positive, got {t.dist_timeout_minutes}")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ForgeError(f"--eval-fraction: must be in [0, 1), got {cfg.data.eval_fraction}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ForgeError(f"--warmup-ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.resume not in ("auto", "never") and not Path(t.resume).is_dir():
        raise ForgeError(f"--resume: {t.resume!r} is neither auto, never, nor a checkpoint directory")
    if cfg.stage == "ppo":
        p = cfg.ppo
        if p.max_new_tokens < 1:
            raise ForgeError(f"--max-new-tokens: must be at least 1, got {p.max_new_tokens}")
        if p.ppo_epochs < 1:
            raise ForgeError(f"--ppo-epochs: must be at least 1, got {p.ppo_epochs}")
        if cfg.data.max_prompt_len + p.max_new_tokens > cfg.data.max_seq_len:
            raise ForgeError(
                f"--max-prompt-len ({cfg.data.max_prompt_len}) + --max-new-tokens ({p.max_new_tokens}) "
                f"exceeds --max-seq-len ({cfg.data.max_seq_len})"
            )
        if p.ptx_coef > 0 and not cfg.data.unsupervised_sources:
            raise ForgeError("--ptx-coef: needs --unsupervised-data")
        if not 0.0 <= p.ema < 1.0:
            raise ForgeError(f"--ema: must be in [0, 1), got {p.ema}")
    # DeepSpeed checks that depend on nothing but the config.
    from forgepipe.deepspeed_config import validate_static

    validate_static(cfg)
