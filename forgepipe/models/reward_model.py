"""Reward model and critic: a causal-LM backbone with a scalar head, per token.

The weights live in an `AutoModelForSequenceClassification(num_labels=1)` (backbone under
`base_model_prefix`, head `score`), so a stage-2 export loads in plain transformers as a
sequence classifier. We do not use its pooled forward: the PPO critic needs a value at every
token, and the reward is then read at the last real token (`last_token_scores`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from forgepipe.errors import ForgeError
from forgepipe.models import attention
from forgepipe.models.load import (
    LoraSettings,
    apply_lora,
    enable_checkpointing,
    hf_from_pretrained,
    merge_lora,
    prepare_model,
    torch_dtype,
)


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, L] -> [B]: the value at the last position whose mask is 1.

    Works for right and left padding (the last 1 is found by index, not by counting). This is
    the TRL/OpenRLHF convention and what HF sequence classification does; DeepSpeed-Chat instead
    averaged the scores over the tokens where chosen and rejected diverge.
    """
    positions = torch.arange(values.shape[-1], device=values.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(dim=-1)
    return values.gather(-1, last.unsqueeze(-1)).squeeze(-1)


class ScalarHeadModel(nn.Module):
    """Per-token scalar values from a (possibly LoRA-wrapped) HF sequence-classification model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # an AutoModelForSequenceClassification, or a PeftModel around one

    @property
    def hf(self) -> nn.Module:
        """The transformers model underneath any PEFT wrapper (LoRA layers live inside it)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base is not None else self.model

    @property
    def config(self):
        return self.hf.config

    def gradient_checkpointing_enable(self) -> None:
        enable_checkpointing(self.hf)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, L] tokens -> [B, L] float32 values.

        Position ids count real tokens only (as OpenRLHF), so a left-padded prompt gets the
        same positions as the right-padded one; rotary models do not care, absolute ones do.
        Without a mask (a right-padded batch under the causal mask alone, models/attention.py) the
        positions are the plain 0..L-1, which are the same for every real token.
        """
        hf = self.hf
        backbone = getattr(hf, hf.base_model_prefix)
        if attention_mask is None:
            hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state
            return hf.score(hidden).squeeze(-1).float()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False).last_hidden_state
        return hf.score(hidden).squeeze(-1).float()

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """A transformers sequence-classification export, LoRA merged (on a copy)."""
        merge_lora(self.model).save_pretrained(save_directory, **kwargs)


def _config(path: str, trust_remote_code: bool = False):
    return hf_from_pretrained(AutoConfig.from_pretrained, path, "model config",
                            trust_remote_code=trust_remote_code)


def has_scalar_head(path: str) -> bool:
    """True for a reward export: a *ForSequenceClassification config with one label."""
    config = _config(path)
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels == 1


def load_scalar_model(path: str, *, dtype: str, tokenizer: PreTrainedTokenizerBase | None = None,
                      gradient_checkpointing: bool = False, lora: LoraSettings | None = None,
                      trust_remote_code: bool = False, attn_implementation: str = "auto") -> ScalarHeadModel:
    """A reward export (head loaded) or a causal-LM checkpoint (head new, from torch's RNG)."""
    config = _config(path, trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        raise ForgeError(f"model {path!r}: a sequence classifier with {config.num_labels} labels, "
                         "not a scalar reward model (num_labels 1)")
    model = hf_from_pretrained(AutoModelForSequenceClassification.from_pretrained, path, "model",
                             num_labels=1, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    attention.use(model, attn_implementation)
    prepare_model(model, tokenizer=tokenizer, gradient_checkpointing=gradient_checkpointing)
    if lora is not None:
        model = apply_lora(model, lora, task_type="SEQ_CLS")  # the head stays fully trainable
    return ScalarHeadModel(model)
