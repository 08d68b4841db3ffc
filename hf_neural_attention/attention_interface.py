"""The Transformers glue: one attention function for every variant, registered with AttentionInterface (and a mask
function with AttentionMaskInterface) under the variant's name.

Importing this file registers "dot", "expressive", "neural" and "cdape". The function prepares the inputs once
(GQA, scaling, mask split), then branches: the variant's fast path unless the caller records the weights, else the
plain path.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .injection import FALLBACK_ATTRIBUTE, VARIANT_ATTRIBUTE
from .masks import restrict_to_window, split_attention_mask
from .registry import VARIANT_CLASSES, VARIANTS

# Keyword arguments some models pass to attention functions that change the weights; none of the variants implements
# them, so they are refused rather than dropped.
UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")

# Parameter-free variants run on modules that were never converted (set_attn_implementation("expressive")).
_PARAMETER_FREE = {name: cls(0, 0) for name, cls in VARIANT_CLASSES.items() if not cls.has_parameters}


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, L, D] -> [B, H_kv * n_rep, L, D], each kv head repeated for its group of query heads."""
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, length, head_dim)


def attention_weights_requested(kwargs: dict) -> bool:
    """Whether the caller wants the attention weights: an `output_attentions` argument, or Transformers' output
    recorder collecting attentions for this forward (how `model(..., output_attentions=True)` works in 5.x)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another Transformers layout: be safe, return the weights
        return True
    try:
        collected = _active_collector.get()
    except LookupError:
        return False
    return bool(collected) and any(str(name).endswith("attentions") for name in collected)


def variant_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    variant_name: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AttentionInterface function: query [B, H, Lq, D], key/value [B, H_kv, Lk, D] -> ([B, Lq, H, D], weights)."""
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"attention variant {variant_name!r} does not support the {name!r} argument of this model")

    variant = getattr(module, VARIANT_ATTRIBUTE, None)
    if variant is None:
        fallback = getattr(module, FALLBACK_ATTRIBUTE, None)
        if fallback == "sdpa":  # a layer convert() left untouched keeps the stock implementation it had
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if fallback == "eager":
            variant = _PARAMETER_FREE["dot"]
        elif variant_name in _PARAMETER_FREE:
            variant = _PARAMETER_FREE[variant_name]
        else:
            raise ValueError(
                f"{type(module).__name__} has no {variant_name!r} parameters. A variant checkpoint loaded with its stock "
                "class lacks them: load it with AutoModel*.from_pretrained (trust_remote_code=True where "
                "hf_neural_attention is not installed); to add the variant to a stock model, use "
                f"hf_neural_attention.convert(model, {variant_name!r}) instead of selecting the implementation"
            )
    elif variant.name != variant_name:
        raise ValueError(
            f"this model runs attention implementation {variant_name!r} but {type(module).__name__} holds a "
            f"{variant.name!r} variant; convert the whole model with one variant"
        )

    batch, num_heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    if num_heads % key.shape[1] != 0:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {key.shape[1]} key/value heads")
    key = repeat_kv(key, num_heads // key.shape[1])  # [B, H, Lk, D]
    value = repeat_kv(value, num_heads // value.shape[1])
    if scaling is None:
        scaling = head_dim**-0.5

    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    mask = split_attention_mask(attention_mask, q_len, k_len, bool(is_causal), query.device)
    window = kwargs.get("sliding_window")
    if window is not None:  # Mistral, Qwen2, Gemma 2/3 sliding layers: a banded causal mask
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"sliding_window must be a positive integer; got {window!r}")
        mask = restrict_to_window(mask, q_len, k_len, window, query.device)

    # The variant's fast path (chunked or compiled; same numbers) runs unless the caller records the weights.
    if not attention_weights_requested(kwargs):
        output = variant.attention_output(query, key, value, mask, scaling, dropout, module.training)
        if output is not None:  # None: the fast path does not apply to these inputs
            return output.transpose(1, 2).contiguous(), None

    weights = variant.attention_weights(query, key, mask, scaling)  # [B, H, Lq, Lk], float32
    weights = weights.to(value.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value)  # [B, H, Lq, D]
    return output.transpose(1, 2).contiguous(), weights


def variant_mask(*args: Any, allow_is_causal_skip: bool = True, **kwargs: Any) -> torch.Tensor | None:
    """Mask function for every variant: the boolean [B, 1, Lq, Lk] mask, never skipped for a causal pattern.

    SDPA's mask function may return None and rely on `is_causal`; the variants need the actual pattern.
    """
    return sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)


def register_variants() -> None:
    """Registers every variant with AttentionInterface and AttentionMaskInterface under its own name."""
    for name in VARIANTS:
        AttentionInterface.register(name, functools.partial(variant_attention_forward, variant_name=name))
        AttentionMaskInterface.register(name, variant_mask)


register_variants()
