"""The one integration layer: registers every variant with Transformers' AttentionInterface and its mask interface,
finds attention modules by contract, and injects each variant's parameters into them.

Importing this file registers "dot", "expressive", "neural" and "cdape" as attention implementations, each with a
mask function under the same name (without it Transformers hands the function no mask at all).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Iterable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cdape import CDAPEAttention
from .common import repeat_kv, split_attention_mask
from .dot import DotProductAttention
from .expressive import ExpressiveAttention
from .neural import NeuralAttention

logger = logging.getLogger(__name__)

VARIANT_CLASSES: dict[str, type[nn.Module]] = {
    cls.name: cls for cls in (DotProductAttention, ExpressiveAttention, NeuralAttention, CDAPEAttention)
}
VARIANTS: tuple[str, ...] = tuple(VARIANT_CLASSES)

# Attribute names on a converted attention module: the variant's parameters, or (untouched layers) the stock
# implementation it keeps.
VARIANT_ATTRIBUTE = "attention_variant"
FALLBACK_ATTRIBUTE = "attention_variant_fallback"

# Keyword arguments some models pass to attention functions that change the weights; none of the variants implements
# them, so they are refused rather than dropped.
UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "position_bias", "s_aux", "sinks")


def variant_class(variant: str) -> type[nn.Module]:
    if variant not in VARIANT_CLASSES:
        raise ValueError(f"Unknown attention variant {variant!r}; valid variants are {list(VARIANTS)}")
    return VARIANT_CLASSES[variant]


def variant_option_names(variant: str) -> list[str]:
    """The keyword options a variant accepts (everything after num_heads and head_dim)."""
    parameters = inspect.signature(variant_class(variant).__init__).parameters
    return [name for name, parameter in parameters.items() if parameter.kind is inspect.Parameter.KEYWORD_ONLY]


def validate_variant_options(variant: str, options: dict | None) -> dict:
    """Checks a variant's option names (the variant's constructor checks the values); returns the options as a dict."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"the options of attention variant {variant!r} must be a mapping; got {options!r}")
    valid = variant_option_names(variant)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for attention variant {variant!r}; valid options are {valid or 'none'}"
        )
    return dict(options)


def parse_layer_spec(spec: Any) -> None | str | list[int]:
    """A layers value from a config or recipe: None, "all", a list of indices or comma-separated indices "0,2"."""
    if spec is None or spec == "all":
        return spec
    if isinstance(spec, str):
        try:
            return [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(f'layers must be None, "all" or comma-separated layer indices; got {spec!r}') from None
    if isinstance(spec, (list, tuple)):
        return list(spec)
    raise ValueError(f'layers must be None, "all" or a list of layer indices; got {spec!r}')


def build_variant(variant: str, num_heads: int, head_dim: int, **options: Any) -> nn.Module:
    valid = variant_option_names(variant)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for attention variant {variant!r}; valid options are {valid or 'none'}"
        )
    return variant_class(variant)(num_heads, head_dim, **options)


# Parameter-free variants run on modules that were never converted (set_attn_implementation("expressive")).
_PARAMETER_FREE = {"dot": DotProductAttention(0, 0), "expressive": ExpressiveAttention(0, 0)}


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
                f"{type(module).__name__} has no {variant_name!r} parameters; "
                f"use hf_neural_attention.convert(model, {variant_name!r}) instead of selecting the implementation"
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

    # A variant's fast path (chunked, fused or compiled; same numbers) runs unless the caller records the weights.
    fast_path = getattr(variant, "attention_output", None)
    if fast_path is not None and not attention_weights_requested(kwargs):
        result = fast_path(query, key, value, mask, scaling, dropout, module.training)
        if result is not None:  # None: the fast path does not apply to these inputs
            output, weights = result
            return output.transpose(1, 2).contiguous(), weights

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


@functools.lru_cache(maxsize=None)
def _calls_attention_interface(module_class: type) -> bool:
    """Whether the class's forward dispatches through Transformers' AttentionInterface (the contract we plug into)."""
    forward = getattr(module_class, "forward", None)
    if forward is None:
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS.get_interface(" in source or "ALL_ATTENTION_FUNCTIONS[" in source


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every attention module that calls AttentionInterface, in model order.

    Their position in this list is the layer index `convert(layers=...)` refers to.
    """
    return [(name, module) for name, module in model.named_modules() if _calls_attention_interface(type(module))]


def attention_geometry(module: nn.Module, config: Any) -> tuple[int, int]:
    """(number of query heads, head dimension) of an attention module."""
    config = getattr(module, "config", config)
    num_heads = (
        getattr(module, "num_heads", None)
        or getattr(module, "num_attention_heads", None)
        or getattr(config, "num_attention_heads", None)
    )
    if not num_heads:
        raise ValueError(f"cannot tell the number of attention heads of {type(module).__name__}")
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "attention_head_size", None)
        or getattr(config, "head_dim", None)
        or config.hidden_size // num_heads
    )
    return int(num_heads), int(head_dim)


def resolve_layers(layers: None | str | Iterable[int], default: str, num_layers: int) -> list[int]:
    """None -> the variant's paper default ("first" or "all"); "all"; or explicit indices in [0, num_layers)."""
    if layers is None:
        layers = [0] if default == "first" else "all"
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f'layers must be None, "all" or a list of layer indices; got {layers!r}')
        return list(range(num_layers))
    try:
        indices = list(layers)
    except TypeError:
        raise ValueError(f'layers must be None, "all" or a list of layer indices; got {layers!r}') from None
    if not indices:
        raise ValueError("layers is an empty list; give at least one layer index, \"all\" or None")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"layer indices must be integers; got {index!r}")
        if not 0 <= index < num_layers:
            raise ValueError(
                f"layer index {index} is out of range: this model has {num_layers} attention layers (0..{num_layers - 1})"
            )
    return sorted(set(indices))


def _base_implementation(model: nn.Module) -> str:
    """The stock implementation untouched layers keep: eager stays eager, everything else runs through SDPA
    (flash and flex kernels take masks in other formats than the variants' boolean one)."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if current not in ("eager", "sdpa"):
        logger.warning("layers left untouched by convert() run %r attention through SDPA instead", current)
        return "sdpa"
    return current


def apply_variant(
    model: nn.Module, variant: str, layers: None | str | Iterable[int] = None, **options: Any
) -> list[int]:
    """Injects the variant's parameters into the targeted attention modules and records the choice on the config.

    Keeps every existing weight. Returns the targeted layer indices. Does not switch the attention implementation.
    """
    cls = variant_class(variant)
    modules = find_attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention module that dispatches through Transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS.get_interface), so no variant can be plugged in"
        )
    if any(hasattr(module, VARIANT_ATTRIBUTE) for _, module in modules):
        raise ValueError(f"{type(model).__name__} is already converted to an attention variant")
    targets = resolve_layers(layers, cls.default_layers, len(modules))
    base = _base_implementation(model)
    config = getattr(model, "config", None)

    # Build every variant module before touching the model, so a bad option leaves it unchanged.
    variant_modules = {}
    for index in targets:
        module = modules[index][1]
        num_heads, head_dim = attention_geometry(module, config)
        variant_module = build_variant(variant, num_heads, head_dim, **options)
        reference = next((p for p in module.parameters() if p.is_floating_point()), None)
        if reference is not None:
            variant_module.to(device=reference.device, dtype=reference.dtype)
        variant_modules[index] = variant_module

    for index, (_, module) in enumerate(modules):
        if index in variant_modules:
            module.add_module(VARIANT_ATTRIBUTE, variant_modules[index])
        else:
            setattr(module, FALLBACK_ATTRIBUTE, base)
    resolved_options = variant_modules[targets[0]].options

    if config is not None:
        config.attention_variant = variant
        config.attention_variant_options = resolved_options
        config.attention_variant_layers = targets
    return targets
