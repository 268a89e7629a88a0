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

from forgepipe.deepspeed_config import validate_static
from forgepipe.errors import ForgeError
from forgepipe.options import label

Stage = Literal["sft", "reward", "ppo", "dpo"]
STAGES: tuple[str, ...] = ("sft", "reward", "ppo")  # the shares of data.split, in its order
# Stages beyond the three of the split read another stage's share: DPO trains on the preference
# pairs, the reward share (so `pipeline --method dpo` is SFT on the sft share, DPO on the reward one).
SHARE_OF: dict[str, str] = {"dpo": "reward"}
KNOWN_STAGES: tuple[str, ...] = STAGES + tuple(SHARE_OF)
# data.split when none is given. A stage run alone trains on all of its data (whole_split); the
# pipeline shares one source among its stages, DeepSpeed-Chat style (sft 2, reward 4, ppo 4 tenths).
PIPELINE_SPLIT = "2,4,4"
# What `--help` says of a default that depends on the command (cli.py; the value stays None).
DEFAULT_NOTES: dict[str, str] = {"data.split": f"all of the stage's data; pipeline: {PIPELINE_SPLIT}"}


def data_share(stage: str) -> str:
    """The stage of data.split whose share `stage` trains on (itself, for sft, reward and ppo)."""
    return SHARE_OF.get(stage, stage)


@dataclass(frozen=True)
class Bounds:
    """Where a number may lie; `validate` checks every bounded field, one message form for all."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def violation(self, value: float) -> str | None:
        """Why `value` is out of bounds, or None."""
        low_ok = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        high_ok = (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        return None if low_ok and high_ok else f"must {self.describe()}, got {value}"

    def describe(self) -> str:
        def num(x: float) -> str:  # 4294967295, not 4.29497e+09
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        low = f"[{num(self.ge)}" if self.ge is not None else f"({num(self.gt)}" if self.gt is not None else None
        high = f"{num(self.le)}]" if self.le is not None else f"{num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"be in {low}, {high}"
        if self.ge is not None:
            return "not be negative" if self.ge == 0 else f"be at least {self.ge:g}"
        if self.gt is not None:
            return "be positive" if self.gt == 0 else f"be greater than {self.gt:g}"
        return f"be at most {self.le:g}" if self.le is not None else f"be below {self.lt:g}"


def bounded(default: Any, **limits: float) -> Any:
    """A config field whose value must lie within `limits` (ge, gt, le, lt); None is always allowed."""
    return field(default=default, metadata={"bounds": Bounds(**limits)})


@dataclass
class ModelConfig:
    """Which model to train and how to adapt it."""

    name_or_path: str = ""  # a catalog name (forge-s, ...), a local directory, or a Hub name
    tokenizer: str | None = None  # defaults to the model's own
    catalog: str | None = None  # catalog YAML; default: $FORGEPIPE_CATALOG, then the bundled one
    lora_dim: int = bounded(0, ge=0)  # 0 disables LoRA
    lora_alpha: float = bounded(16.0, gt=0)
    lora_dropout: float = bounded(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | None = None  # None: the architecture's linear layers
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # auto: SDPA, with the head dimension zero-padded to a multiple of 8 where the fused kernels need it
    # (FORGE-s: 86 -> 88; exact); or any transformers name: sdpa, eager, flash_attention_2, ...
    attn_implementation: str = "auto"


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes token batches."""

    sources: list[str] = field(default_factory=list)  # files, saved-dataset dirs, or Hub names
    # Shares of each source for stages sft,reward,ppo (DeepSpeed-Chat style; dpo reads reward's). None:
    # all of it for a stage run alone (validate resolves it to whole_split, e.g. 1,0,0 for sft), and
    # PIPELINE_SPLIT for `forgepipe pipeline`.
    split: str | None = None
    eval_fraction: float = bounded(0.1, ge=0, lt=1)  # held out of each stage's share for evaluation
    max_seq_len: int = bounded(512, ge=1)
    max_prompt_len: int = bounded(256, ge=1)  # prompt budget (PPO generation prompts; SFT/reward left-truncation)
    packing: bool = False  # pack several short SFT samples into one sequence
    group_by_length: bool = False  # micro-batches of like-length samples (less padding; seeded, resumable)
    # Batch lengths rounded up to a multiple of this (1: the longest row). On GPUs a few lengths instead of
    # one per step spare the per-shape work: cuDNN attention plans, torch.compile's recompiles.
    pad_to_multiple_of: int = bounded(1, ge=1)
    chat_template: str = "auto"  # auto (the tokenizer's, else HH text) | none (HH text) | a Jinja file
    train_on_all_turns: bool = False  # SFT loss on every assistant turn of a conversation, not only the last
    cache_dir: str | None = None  # tokenized cache; default: <output_dir>/.cache
    unsupervised_sources: list[str] = field(default_factory=list)  # {text} documents for PPO-ptx
    max_dropped_fraction: float = bounded(0.1, ge=0, le=1)  # a source losing more of its rows (no format fits) is an error
    eval_max_samples: int = bounded(2000, ge=0)  # held-out rows evaluated at most (0: all)


@dataclass
class TrainConfig:
    """The optimisation loop shared by every stage."""

    per_device_batch_size: int = bounded(4, ge=1)
    # > 0: SFT/reward/DPO micro-batches hold as many samples as fit this many padded tokens (rows x longest
    # length), length-grouped, seeded and resumable; 0: --per-device-batch-size rows each
    tokens_per_micro_batch: int = bounded(0, ge=0)
    grad_accum: int = bounded(1, ge=1)
    lr: float = bounded(1e-5, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    warmup_ratio: float = bounded(0.05, ge=0, lt=1)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    epochs: int = bounded(1, ge=1)
    max_steps: int = bounded(0, ge=0)  # optimizer steps; 0 means run the epochs
    seed: int = bounded(1234, ge=0, le=2**32 - 1)  # numpy's seed range
    grad_clip: float = bounded(1.0, ge=0)  # 0: no clipping
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    eval_generations: int = bounded(8, ge=0)  # held-out generations (reward: scored pairs) logged per evaluation
    eval_max_new_tokens: int = bounded(64, ge=1)  # longest SFT/DPO answer generated for that table
    eval_every: int = bounded(0, ge=0)  # optimizer steps between evaluations; 0: only at the end
    log_every: int = bounded(1, ge=1)
    save_every: int = bounded(0, ge=0)  # optimizer steps between checkpoints; 0: only at the end
    save_every_minutes: float = bounded(0.0, ge=0)
    keep_last: int = bounded(2, ge=1)  # checkpoints kept on disk
    final_checkpoint: bool = True  # the end-of-run checkpoint (optimizer state): what extending a finished run needs
    # Hand right-padded supervised batches' 2D padding mask to the model. Off: the causal mask alone, exact
    # for right padding (no kept position sees a pad), and SDPA may use its flash/cuDNN kernels.
    padding_mask: bool = False
    compile: bool = False  # torch.compile the trained models (DeepSpeed's engine.compile, dynamic shapes)
    resume: str = "auto"  # auto | never | a checkpoint directory
    allow_changed_inputs: bool = False  # resume although a data or chat-template file changed in place (digests.py)
    peak_tflops: float = bounded(0.0, ge=0)  # per-device peak for MFU (MI250X GCD bf16: 191.5, H100 SXM bf16: 989); 0: off
    dist_timeout_minutes: float = bounded(30.0, gt=0)  # a collective stuck this long aborts the job instead of hanging it


@dataclass
class DeepSpeedConfig:
    """ZeRO, offload, ZeRO++ and profiler switches (see deepspeed_config.py for the JSON)."""

    # auto: the lowest stage whose per-rank model state fits the device (deepspeed_config.choose_zero_stage),
    # resolved at launch into zero_stage_resolved; ZeRO++ makes it 3, --offload cpu at least 1.
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    zero_stage_resolved: int | None = None  # set at launch (a value given is replaced): the stage run
    offload: Literal["none", "cpu"] = "none"
    zeropp: bool = False  # turns on qwZ + hpZ + qgZ together
    quantized_weights: bool | None = None  # qwZ; None follows `zeropp`
    quantized_gradients: bool | None = None  # qgZ; None follows `zeropp`
    hpz_size: int | None = bounded(None, ge=1)  # hpZ partition size; None: ranks per node when zeropp, else 1
    # Stage-3 knobs used by the FORGE runs.
    param_persistence_threshold: int = bounded(10_000, ge=0)
    max_live_parameters: int = bounded(30_000_000, ge=0)
    prefetch_bucket_size: int = bounded(30_000_000, ge=0)
    allgather_bucket_size: int = bounded(500_000_000, ge=0)
    reduce_bucket_size: int = bounded(500_000_000, ge=1)
    overlap_comm: bool = True  # with one rank off whatever this says: there is nothing to overlap
    contiguous_gradients: bool = True
    torch_adam: bool = False  # use torch's Adam instead of DeepSpeed's fused/CPU op (no JIT build)
    # bf16: DeepSpeed's per-parameter inf/NaN check before each step (skips bad steps; ~10 kernels per
    # parameter and a host sync per step). Off: the gradient norm (computed anyway) stops a diverged run.
    check_grad_overflow: bool = False
    flops_profiler: bool = False
    profile_step: int = bounded(2, ge=1)  # optimizer step at which the flops profiler reports


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
    critic_lr: float = bounded(5e-6, gt=0)
    critic_zero_stage: Literal["auto", 0, 1, 2, 3] | None = None  # None: same as the actor; auto: the memory rule
    critic_lora_dim: int = bounded(0, ge=0)
    critic_gradient_checkpointing: bool = False
    ref_zero_stage: Literal["auto", 0, 1, 2, 3] | None = None  # reference and reward models; None: the actor's
    # Set at launch (a value given is replaced): the stages the critic and the frozen models run at.
    critic_zero_stage_resolved: int | None = None
    ref_zero_stage_resolved: int | None = None
    allow_tokenizer_mismatch: bool = False
    max_new_tokens: int = bounded(64, ge=1)
    temperature: float = bounded(1.0, gt=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    generation_batch_size: int | None = bounded(None, ge=1)  # prompts per rank per experience batch
    ppo_epochs: int = bounded(1, ge=1)
    eval_prompts: int = bounded(64, ge=0)  # held-out prompts policy and reference answer per evaluation (0: off)
    kl_coef: float = bounded(0.1, ge=0)
    reward_clip: float = bounded(5.0, gt=0)
    policy_clip: float = bounded(0.2, gt=0)
    value_clip: float = bounded(0.2, gt=0)
    gamma: float = bounded(1.0, ge=0, le=1)
    lam: float = bounded(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    ptx_coef: float = bounded(0.0, ge=0)  # unsupervised loss coefficient (needs data.unsupervised_sources)
    ema: float = bounded(0.0, ge=0, lt=1)  # EMA decay of the actor for export; 0 disables
    gather_for_generation: bool = True  # gather ZeRO-3 params once per generation batch
    # Stop when the sampler's log-probs differ from the training forward's by more than this many nats per
    # response token on average (a sampler with other weights or a broken cache silently biases PPO)
    max_rollout_logprob_gap: float = bounded(0.5, gt=0)
    rollout_check_every: int = bounded(8, ge=1)  # generated tokens between the host's "all ended?" checks
    # dynamic: the KV cache grows a token at a time; static: allocated once per call (prompt + max_new_tokens),
    # every decode step one shape, which rollout_compile can capture as a CUDA/HIP graph
    # Tokens per scoring forward (actor, reference, critic and reward over a rollout): as many rows as fit
    # at the rollout's longest length; 0: --per-device-batch-size rows (the training micro-batch)
    scoring_tokens: int = bounded(16384, ge=0)
    rollout_cache: Literal["dynamic", "static"] = "dynamic"
    rollout_compile: bool = False  # torch.compile the decode step (graphs on a GPU); needs rollout_cache static


@dataclass
class DPOConfig:
    """Direct preference optimisation (`forgepipe dpo`): the loss and the frozen reference."""

    ref_model: str | None = None  # None: the starting model (with LoRA: the policy with its adapters off)
    loss: Literal["dpo", "ipo", "simpo"] = "dpo"  # sigmoid DPO, IPO, reference-free SimPO
    beta: float = bounded(0.1, gt=0)  # DPO/IPO: 0.1 is usual; SimPO wants 2-10
    label_smoothing: float = bounded(0.0, ge=0, lt=0.5)  # share of labels assumed flipped (cDPO); dpo, simpo
    gamma_beta_ratio: float = bounded(0.25, ge=0)  # SimPO's target margin gamma / beta
    precompute_ref: bool = False  # reference log-probs once before training (cached), then the reference is freed


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
    dpo: DPOConfig = field(default_factory=DPOConfig)

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


def _coerce(value: Any, annotation: Any) -> Any:
    """Convert a YAML or command-line value to the field's type; a ForgeError says why not
    (the caller adds where the value came from)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for candidate in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, candidate)
            except ForgeError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        raise ForgeError(f"{value!r} is not one of {', '.join(str(a) for a in args)}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ForgeError(f"expected a list, got {value!r}")
        return [_coerce(v, args[0]) for v in value]
    return _coerce_scalar(value, annotation)


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _coerce_scalar(value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ForgeError(f"expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ForgeError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ForgeError(f"expected an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ForgeError(f"expected a number, got {value!r}") from None
    if annotation is str and isinstance(value, (dict, list)):
        raise ForgeError(f"expected a string, got {value!r}")
    return str(value) if annotation is str else value


def _apply(target: Any, updates: dict[str, Any], where: str) -> None:
    """Set a YAML mapping's keys on a config section; errors name the file and the key."""
    hints = typing.get_type_hints(type(target))
    for key, value in updates.items():
        if key not in hints:
            raise ForgeError(f"{where}: unknown key {key!r} (known: {', '.join(hints)})")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ForgeError(f"{where}{key}: expected a mapping, got {value!r}")
            _apply(current, value, f"{where}{key}.")
            continue
        try:
            setattr(target, key, _coerce(value, hints[key]))
        except ForgeError as exc:
            raise ForgeError(f"{where}{key}: {exc.message}") from None


def set_dotted(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key (e.g. `deepspeed.zero_stage`) with type coercion; errors carry the key."""
    *path, name = key.split(".")
    node: Any = cfg
    for part in path:
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            raise ForgeError(f"unknown config key {key!r}", key=key)
    hints = typing.get_type_hints(type(node))
    if name not in hints or dataclasses.is_dataclass(getattr(node, name)):
        raise ForgeError(f"unknown config key {key!r}", key=key)
    try:
        setattr(node, name, _coerce(value, hints[name]))
    except ForgeError as exc:
        raise ForgeError(exc.message, key=key) from None


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
    layers: list[tuple[dict[str, Any], str]] | None = None,
) -> Config:
    """Defaults <- YAML file <- extra layers <- overrides (dotted keys; None values are skipped),
    then validate.

    `layers` are (mapping, where) pairs applied after the file (the pipeline's per-stage sections).
    """
    cfg = Config(stage=stage)
    all_layers = [(load_yaml(config_file), f"{config_file}: ")] if config_file else []
    for tree, where in all_layers + list(layers or []):
        _apply(cfg, tree, where)
        cfg.stage = stage
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(cfg, key, value)
    validate(cfg)
    return cfg


def whole_split(stage: str) -> str:
    """The data.split that gives `stage` every row: its share 1, the others 0 ('1,0,0' for sft,
    '0,1,0' for reward and dpo)."""
    index = STAGES.index(data_share(stage))
    return ",".join("1" if i == index else "0" for i in range(len(STAGES)))


def stage_fraction(spec: str, stage: str) -> float:
    """The share of every source that `stage` takes under data.split `spec` (1.0: all of it)."""
    return parse_split(spec)[STAGES.index(data_share(stage))]


def parse_split(spec: str) -> tuple[float, float, float]:
    """'2,4,4' -> normalised shares for (sft, reward, ppo)."""
    try:
        parts = [float(p) for p in spec.split(",")]
    except ValueError:
        raise ForgeError(f"{spec!r} is not three comma-separated numbers", key="data.split") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ForgeError(f"{spec!r} must be three non-negative numbers, e.g. 2,4,4", key="data.split")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def check_bounds(node: Any, prefix: str = "") -> None:
    """Every number finite, every bounded field (see `bounded`) within its bounds."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_bounds(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ForgeError(f"must be a finite number, got {value}", key=key)
        elif value is not None and "bounds" in f.metadata:
            problem = f.metadata["bounds"].violation(value)
            if problem:
                raise ForgeError(problem, key=key)


def validate(cfg: Config) -> None:
    """Checks that need no model, data or launcher. Raises ForgeError with one line. An unset
    data.split becomes the stage's whole_split here, so a validated config names the rows it reads."""
    if cfg.stage not in KNOWN_STAGES:
        raise ForgeError(f"unknown stage {cfg.stage!r} (known: {', '.join(KNOWN_STAGES)})")
    if cfg.data.split is None:  # the one default that depends on the stage: all of its data
        cfg.data.split = whole_split(cfg.stage)
    if stage_fraction(cfg.data.split, cfg.stage) == 0:
        raise ForgeError(f"{cfg.data.split!r} leaves stage {cfg.stage} no data", key="data.split")
    check_bounds(cfg)
    from forgepipe.data.chat_template import check_setting  # plain Python: no data libraries

    check_setting(cfg.data.chat_template)
    if cfg.train.resume not in ("auto", "never") and not Path(cfg.train.resume).is_dir():
        raise ForgeError(f"{cfg.train.resume!r} is neither auto, never, nor a checkpoint directory", key="train.resume")
    if cfg.stage == "ppo":
        p, d = cfg.ppo, cfg.data
        if d.max_prompt_len + p.max_new_tokens > d.max_seq_len:
            raise ForgeError(f"{label('data.max_prompt_len')} ({d.max_prompt_len}) + {label('ppo.max_new_tokens')} "
                             f"({p.max_new_tokens}) exceeds {label('data.max_seq_len')} ({d.max_seq_len})")
        if p.ptx_coef > 0 and not d.unsupervised_sources:
            raise ForgeError(f"needs {label('data.unsupervised_sources')}", key="ppo.ptx_coef")
        if p.rollout_compile and p.rollout_cache != "static":
            raise ForgeError(f"needs {label('ppo.rollout_cache')} static (a decode step of one shape)",
                             key="ppo.rollout_compile")
    if cfg.stage == "dpo":
        validate_dpo(cfg.dpo)
    validate_token_budget(cfg)
    validate_static(cfg)


def validate_token_budget(cfg: Config) -> None:
    """A token budget must hold the longest sample (both rows of a pair); PPO says it does not use one."""
    budget = cfg.train.tokens_per_micro_batch
    if not budget:
        return
    if cfg.stage == "ppo":  # a pipeline hands its options to every stage: said, not refused
        import logging

        logging.getLogger(__name__).info("ppo: %s applies to the supervised stages; PPO's experience batches are "
                                         "prompts", label("train.tokens_per_micro_batch"))
        return
    rows = 2 if data_share(cfg.stage) == "reward" else 1
    multiple = cfg.data.pad_to_multiple_of
    need = rows * -(-cfg.data.max_seq_len // multiple) * multiple
    if budget < need:
        raise ForgeError(f"{budget} tokens hold no {cfg.stage} sample of {label('data.max_seq_len')} "
                         f"{cfg.data.max_seq_len}{' (a pair: two rows)' if rows == 2 else ''}: at least {need}",
                         key="train.tokens_per_micro_batch")


def validate_dpo(p: DPOConfig) -> None:
    """Options that mean nothing for the chosen loss are refused rather than silently ignored."""
    loss = label("dpo.loss")
    if p.loss == "simpo" and (p.ref_model or p.precompute_ref):
        key = "dpo.ref_model" if p.ref_model else "dpo.precompute_ref"
        raise ForgeError(f"{loss} simpo is reference-free: it reads no reference model", key=key)
    if p.loss == "ipo" and p.label_smoothing:
        raise ForgeError(f"applies to {loss} dpo and simpo, not ipo", key="dpo.label_smoothing")  # the DeepSpeed rules that depend on nothing but the config
