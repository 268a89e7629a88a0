"""Which attention kernel a training forward gets, and the two things forgepipe does about it.

PyTorch's scaled_dot_product_attention picks a kernel per call: flash, memory-efficient, cuDNN,
or the plain "math" one that materialises the [L, L] score matrix. Two things push a training
forward onto the slow path, and both are avoidable without changing a single number:

- **A dense padding mask.** Flash and cuDNN take no mask, only `is_causal`. For a right-padded
  batch under a causal mask the mask changes nothing that is kept: a real token attends only to
  earlier positions, which are all real; padding positions compute garbage that no loss reads.
  So supervised batches go to the model without it (`train.padding_mask`, off by default: the
  collators mark such batches `causal_only`, and `forward_mask` leaves the mask out).
- **A head dimension the fused kernels refuse.** They need a multiple of 8; FORGE-s has
  2064 / 24 = 86. `padded_sdpa` zero-pads q, k and v to the next multiple (88), passes the
  original 1/sqrt(86) scale, and slices the output back: the zero columns add nothing to q.k and
  produce zero output columns, so the result is exact. Registered with transformers as
  `sdpa_padded`; `model.attn_implementation auto` picks it only where the head dimension needs it.

Nothing here is CUDA-only: on ROCm the same SDPA call reaches its own flash/efficient kernels, on
the CPU the math kernel (where padding is harmless).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PADDED = "sdpa_padded"
CAUSAL_ONLY = "causal_only"  # a collated batch's flag: forward it without its 2D mask
HEAD_DIM_MULTIPLE = 8  # flash, memory-efficient and cuDNN attention all want a multiple of 8


def padded_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs):
    """transformers' SDPA attention with the head dimension padded to a multiple of 8 (exact)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    d = query.shape[-1]
    pad = -d % HEAD_DIM_MULTIPLE
    if pad == 0 or value.shape[-1] != d:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scaling = d ** -0.5 if scaling is None else scaling
    query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
    return out[..., :d], weights  # [B, L, H, d]: the model reshapes it to [B, L, H*d]


def register() -> None:
    """Make `sdpa_padded` a name transformers accepts (attention and its mask builder). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PADDED, padded_sdpa)
    if PADDED not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(PADDED, sdpa_mask)


def head_dim(config) -> int | None:
    """The attention head dimension of a transformers config (None when it cannot be told)."""
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def resolve(setting: str, config) -> str:
    """The transformers attn_implementation for `model.attn_implementation`: `auto` is SDPA, padded
    where the head dimension needs it; any other value (sdpa, eager, flash_attention_2, ...) as given."""
    if setting != "auto":
        return setting
    d = head_dim(config)
    if d is not None and d % HEAD_DIM_MULTIPLE:
        return PADDED
    return "sdpa"


def use(model, setting: str) -> str:
    """Switch a loaded transformers model to the attention `setting` resolves to; returns the name."""
    name = resolve(setting, model.config)
    if name == PADDED:
        register()
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)
    return name


def forward_mask(batch: dict):
    """The 2D mask a collated batch's forward takes: None where the collator marked the batch
    `causal_only` (right-padded, train.padding_mask off; see the module docstring)."""
    return None if batch.get(CAUSAL_ONLY) else batch["attention_mask"]


def sdpa_backends(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                  is_causal: bool = True) -> dict[str, bool]:
    """Which SDPA kernels accept these inputs (each tried alone): for the benchmark and the run's tags."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                               is_causal=is_causal and mask is None)
            out[name.lower()] = True
        except RuntimeError:
            out[name.lower()] = False
    return out
