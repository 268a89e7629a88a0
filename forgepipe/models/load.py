"""Load a tokenizer and a causal LM the way every stage needs them: pad token, dtype, LoRA.

What transformers/PEFT do not decide for us, and where RLHF code has gone wrong before:
- GPT-NeoX tokenizers have no pad token. Padding with EOS breaks sequence classification
  (HF finds the last real token as the last non-pad one, and our sequences end with EOS), so
  the pad token is "<|padding|>" when the vocabulary has it, else a new "<|pad|>".
- LoRA target names are per architecture. DeepSpeed-Chat's default pattern matched nothing on
  GPT-NeoX and LoRA silently trained nothing; here a pattern that matches no module is an error.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from forgepipe.errors import ForgeError
from forgepipe.models import attention

log = logging.getLogger(__name__)

PADDING_TOKEN = "<|padding|>"  # GPT-NeoX-20B's, id 1
NEW_PAD_TOKEN = "<|pad|>"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

LORA_TARGETS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ForgeError(f"{name!r} is not one of {', '.join(_DTYPES)}", key="train.dtype")
    return _DTYPES[name]


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank/alpha/dropout and target module names (None: the architecture's defaults)."""

    dim: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    @classmethod
    def from_model_config(cls, model_cfg, dim: int | None = None) -> LoraSettings | None:
        """From a ModelConfig; `dim` overrides lora_dim (e.g. ppo.critic_lora_dim). 0 -> None."""
        dim = model_cfg.lora_dim if dim is None else dim
        if dim <= 0:
            return None
        return cls(dim=dim, alpha=model_cfg.lora_alpha, dropout=model_cfg.lora_dropout,
                   target_modules=model_cfg.lora_target_modules)


def _is_local(path: str) -> bool:
    return Path(path).is_dir()


def hf_from_pretrained(loader, path: str, what: str, **kwargs):
    """Call a from_pretrained; an unreachable or malformed source becomes one ForgeError line."""
    local = _is_local(path)
    try:
        return loader(path, local_files_only=local, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if local else " (compute nodes have no internet: use a local directory or a catalog name)"
        raise ForgeError(f"cannot load {what} from {path!r}: {first}{hint}") from None


def load_tokenizer(path: str, *, padding_side: str = "right", trust_remote_code: bool = False,
                   chat_template: str = "auto") -> PreTrainedTokenizerBase:
    """AutoTokenizer plus a pad token that is not EOS (see the module docstring), with the chat
    template `chat_template` asks for (data/chat_template.py; saved with every export)."""
    from forgepipe.data.chat_template import apply_setting

    tok = hf_from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer",
                           padding_side=padding_side, trust_remote_code=trust_remote_code)
    used = apply_setting(tok, chat_template)
    if used != "none":
        log.info("chat template: %s", "the tokenizer's own" if used == "tokenizer" else used)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if PADDING_TOKEN in tok.get_vocab():
            tok.pad_token = PADDING_TOKEN
        else:
            tok.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
            log.warning("tokenizer %s has no pad token: added %s (id %d); the model's embeddings "
                        "will be resized to %d", path, NEW_PAD_TOKEN, tok.pad_token_id, len(tok))
    return tok


def lora_target_modules(model: nn.Module) -> list[str]:
    """Default LoRA targets: the known names for the architecture, else every linear but the head."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LORA_TARGETS:
        return list(LORA_TARGETS[model_type])
    return linear_module_names(model)


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of nn.Linear modules, excluding the output head and a scalar `score` head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and mod is not head}
    return sorted(names - {"score", "lm_head", "embed_out"})


def check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target must match a module, by PEFT's rule (exact name or '.'-suffix)."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    which = f"none of {targets}" if len(missing) == len(targets) else f"{missing} of {targets}"
    raise ForgeError(f"{which} matches a module of {model_type} "
                     f"(its linear layers: {', '.join(linear_module_names(model))})", key="model.lora_target_modules")


def apply_lora(model: PreTrainedModel, lora: LoraSettings, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap with PEFT LoRA after checking the targets; only LoRA (and a SEQ_CLS head) trains."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules) if lora.target_modules else lora_target_modules(model)
    check_lora_targets(model, targets)
    config = LoraConfig(r=lora.dim, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target that is a container, not a layer
        raise ForgeError(f"{str(exc).splitlines()[0]}", key="model.lora_target_modules") from None


def merge_lora(model: nn.Module) -> nn.Module:
    """A plain transformers model for export: LoRA merged on a copy, the training model untouched."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def prepare_model(model: PreTrainedModel, *, tokenizer: PreTrainedTokenizerBase | None,
                  gradient_checkpointing: bool) -> None:
    """Embedding size and pad id from the tokenizer; checkpointing. Shared by LM and scalar models."""
    if tokenizer is not None:
        weight = model.get_input_embeddings().weight
        rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions hold an empty tensor
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
            weight = model.get_input_embeddings().weight
            log.info("resized embeddings %d -> %d for the tokenizer", rows, getattr(weight, "ds_shape", weight.shape)[0])
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        enable_checkpointing(model)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing, non-reentrant (works when the inputs need no grad, as under LoRA)."""
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as exc:  # "... does not support activation checkpointing"
        raise ForgeError(f"{exc}", key="model.gradient_checkpointing") from None
    model.config.use_cache = False


def check_head_loaded(model: nn.Module, info: dict, path: str) -> None:
    """The language-model head must come from the checkpoint: a reward export (scalar head, no LM
    head) loaded as a causal LM would otherwise train from a randomly initialised head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return
    head_names = {name for name, mod in model.named_modules() if mod is head}
    missing = [k for k in info.get("missing_keys", []) if k.rsplit(".", 1)[0] in head_names]
    if not missing:
        return
    unexpected = info.get("unexpected_keys", [])
    what = "a reward model export (it has a scalar head)" if any(k.startswith("score.") for k in unexpected) \
        else "not a causal language model checkpoint"
    raise ForgeError(f"model {path}: {what}; its language-model head ({missing[0]}) is missing and would start random. "
                     "Give a base model or an SFT export")


def load_causal_lm(path: str, *, dtype: str, tokenizer: PreTrainedTokenizerBase | None = None,
                   gradient_checkpointing: bool = False, lora: LoraSettings | None = None,
                   trust_remote_code: bool = False, attn_implementation: str = "auto") -> nn.Module:
    """A causal LM ready for training: dtype, attention kernel (models/attention.py), embeddings fit
    the tokenizer, pad id, LoRA."""
    model, info = hf_from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model",
                                     dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
                                     output_loading_info=True)
    check_head_loaded(model, info, path)
    attention.use(model, attn_implementation)
    prepare_model(model, tokenizer=tokenizer, gradient_checkpointing=gradient_checkpointing)
    if lora is not None:
        model = apply_lora(model, lora, task_type="CAUSAL_LM")
    return model


def keeps_logits(model) -> bool:
    """Whether the causal LM under the engine (and PEFT) takes `logits_to_keep`: then positions that
    carry no loss (prompts, padding) skip the LM head and the vocabulary-wide softmax
    (transformers' models take it; remote code may not)."""
    module = getattr(model, "module", model)
    module = module.get_base_model() if hasattr(module, "get_base_model") else module
    return "logits_to_keep" in inspect.signature(module.forward).parameters


def logits_at(model, inputs: dict, positions: torch.Tensor | int) -> torch.Tensor:
    """[B, K, V] logits of a causal LM (engine or module) at [B, K] positions per row, or (an int K)
    at the last K positions: the LM head runs there only where the model takes `logits_to_keep` (an
    index tensor, so the device never syncs with the host), else all logits are computed and those
    picked."""
    if keeps_logits(model):
        return model(**inputs, logits_to_keep=positions).logits
    logits = model(**inputs).logits
    if isinstance(positions, int):
        return logits[:, -positions:]
    return torch.take_along_dim(logits, positions[..., None], dim=1)
