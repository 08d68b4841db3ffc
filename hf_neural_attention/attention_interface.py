"""The Transformers glue: one attention function for every variant, registered with AttentionInterface (and a mask
function with AttentionMaskInterface) under the variant's name.

Importing this file registers "dot", "expressive", "neural" and "cdape". The function resolves the module's variant,
prepares the inputs once (autocast dtype, GQA, scaling, the mask) and hands them to dispatch.py, which picks the
engine.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .dispatch import attention as dispatch_attention
from .injection import FALLBACK_ATTRIBUTE, VARIANT_ATTRIBUTE
from .masks import KeyMask, restrict_to_window, split_attention_mask
from .registry import VARIANT_CLASSES, VARIANTS
from .variant import AttentionVariant

# Keyword arguments some models pass to attention functions that change the weights; none of the variants implements
# them, so they are refused rather than dropped.
UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")

# Parameter-free variants run on modules that were never converted (set_attn_implementation("expressive")).
_PARAMETER_FREE = {name: cls(0, 0) for name, cls in VARIANT_CLASSES.items() if not cls.has_parameters}


def attention_weights_requested(kwargs: dict) -> bool:
    """Whether the caller wants the attention weights: an `output_attentions` argument, or Transformers' output
    recorder collecting attentions for this forward (how `model(..., output_attentions=True)` works in 5.x)."""
    return bool(kwargs.get("output_attentions")) or _recorder_collects_attentions()


@torch.compiler.assume_constant_result  # read when a compiled graph is traced: Dynamo cannot trace a ContextVar
def _recorder_collects_attentions() -> bool:
    try:
        collected = _output_collector().get()
    except LookupError:
        return False
    return bool(collected) and any(str(name).endswith("attentions") for name in collected)


@functools.cache
def _output_collector():
    """Transformers' context variable of the outputs a forward records. Without it, weights requested through the
    recorder could not be seen, so the package refuses to run rather than drop them silently."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError as error:
        raise ImportError(
            "hf_neural_attention reads transformers.utils.output_capturing._active_collector to know when a model "
            "records attention weights; this Transformers version does not have it. Install a version the package "
            "supports (see pyproject.toml)"
        ) from error
    return _active_collector


def resolve_variant(module: nn.Module, variant_name: str) -> AttentionVariant | None:
    """The variant a module runs under `variant_name`: its own (convert), a parameter-free one, or None for a layer
    convert() left on SDPA."""
    submodules = getattr(module, "_modules", None)  # an nn.Module's: read directly, not through Module.__getattr__
    variant = (submodules.get(VARIANT_ATTRIBUTE) if submodules is not None
               else getattr(module, VARIANT_ATTRIBUTE, None))  # any object holding a variant (hfna-selftest's layer)
    if variant is not None:
        if variant.name != variant_name:
            raise ValueError(
                f"this model runs attention implementation {variant_name!r} but {type(module).__name__} holds a "
                f"{variant.name!r} variant; convert the whole model with one variant"
            )
        return variant
    fallback = getattr(module, FALLBACK_ATTRIBUTE, None)
    if fallback == "sdpa":  # a layer convert() left untouched keeps the stock implementation it had
        return None
    if fallback == "eager":
        return _PARAMETER_FREE["dot"]
    if variant_name in _PARAMETER_FREE:
        return _PARAMETER_FREE[variant_name]
    raise ValueError(
        f"{type(module).__name__} has no {variant_name!r} parameters. A variant checkpoint loaded with its stock "
        "class lacks them: load it with AutoModel*.from_pretrained (trust_remote_code=True where "
        "hf_neural_attention is not installed); to add the variant to a stock model, use "
        f"hf_neural_attention.convert(model, {variant_name!r}) instead of selecting the implementation"
    )


def autocast_inputs(device_type: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in the autocast dtype where autocast is on for their device (SDPA's rule; call only then): a
    Llama-family model hands float32 rotary q, k next to a bfloat16 v."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def call_mask(module: nn.Module, attention_mask: torch.Tensor | None, q_len: int, k_len: int,
              device: torch.device, kwargs: dict) -> KeyMask:
    """The call's mask: Transformers' mask (None for a purely causal batch, as SDPA gets it), causality as SDPA
    decides it, and the sliding window of Mistral, Qwen2 and Gemma 2/3 sliding layers."""
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    mask = split_attention_mask(attention_mask, q_len, k_len, bool(is_causal), device)
    window = kwargs.get("sliding_window")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"sliding_window must be a positive integer; got {window!r}")
        mask = restrict_to_window(mask, q_len, k_len, window, device)
    return mask


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
    variant = resolve_variant(module, variant_name)
    if variant is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    device = query.device
    autocast_enabled = torch.is_autocast_enabled(device.type)  # one lookup for the inputs and the dispatcher
    if autocast_enabled:
        query, key, value = autocast_inputs(device.type, query, key, value)
    num_heads, head_dim = query.shape[1], query.shape[3]
    if num_heads % key.shape[1] != 0:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {key.shape[1]} key/value heads")
    mask = call_mask(module, attention_mask, query.shape[2], key.shape[2], device, kwargs)
    output, weights = dispatch_attention(
        variant, query, key, value, mask, head_dim**-0.5 if scaling is None else scaling,
        dropout if module.training else 0.0, attention_weights_requested(kwargs), autocast_enabled=autocast_enabled,
    )
    return output.transpose(1, 2).contiguous(), weights  # [B, Lq, H, D]


def variant_mask(*args: Any, allow_is_causal_skip: bool = True, **kwargs: Any) -> torch.Tensor | None:
    """Mask function for every variant: SDPA's boolean [B, 1, Lq, Lk] mask, or None for a purely causal batch where
    Transformers allows it (as SDPA gets it); the attention function then knows the pattern from `is_causal` without
    materialising or comparing an Lq x Lk mask."""
    return sdpa_mask(*args, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def register_variants() -> None:
    """Registers every variant with AttentionInterface and AttentionMaskInterface under its own name."""
    for name in VARIANTS:
        AttentionInterface.register(name, functools.partial(variant_attention_forward, variant_name=name))
        AttentionMaskInterface.register(name, variant_mask)


register_variants()
