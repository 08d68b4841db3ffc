"""Finding a model's attention modules and injecting a variant's parameters into them.

An attention module is one whose forward dispatches through Transformers' AttentionInterface: its code looks up the
global `ALL_ATTENTION_FUNCTIONS` and that global is Transformers' own interface object (read from the compiled code
object and its globals, so it works without source files). A class can also say so itself with a boolean class
attribute `calls_attention_interface`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterable

from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .registry import variant_class

logger = logging.getLogger(__name__)

# Attribute names on a converted attention module: the variant's parameters, or (untouched layers) the stock
# implementation it keeps.
VARIANT_ATTRIBUTE = "attention_variant"
FALLBACK_ATTRIBUTE = "attention_variant_fallback"
HOOK_ATTRIBUTE = "_attention_variant_hook"


@functools.lru_cache(maxsize=None)
def calls_attention_interface(module_class: type) -> bool:
    """Whether the class's forward dispatches through Transformers' AttentionInterface (the contract we plug into)."""
    declared = getattr(module_class, "calls_attention_interface", None)
    if isinstance(declared, bool):
        return declared
    forward = getattr(module_class, "forward", None)
    while hasattr(forward, "__wrapped__"):  # decorators (deprecate_kwarg, ...) wrap the real forward
        forward = forward.__wrapped__
    code, globals_ = getattr(forward, "__code__", None), getattr(forward, "__globals__", {})
    if code is None:
        return False
    return "ALL_ATTENTION_FUNCTIONS" in code.co_names and globals_.get("ALL_ATTENTION_FUNCTIONS") is ALL_ATTENTION_FUNCTIONS


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every attention module that calls AttentionInterface, in model order.

    Their position in this list is the layer index `convert(layers=...)` refers to.
    """
    return [(name, module) for name, module in model.named_modules() if calls_attention_interface(type(module))]


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


def parse_layer_spec(spec: Any) -> None | str | list[int]:
    """A layers value from a config, a recipe or the API: None, "all", a list of indices or comma-separated indices
    "0,2" (the one parser of layer lists)."""
    if spec is None or spec == "all":
        return spec
    if isinstance(spec, str):
        try:
            return [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(f'layers must be None, "all" or comma-separated layer indices; got {spec!r}') from None
    if isinstance(spec, (list, tuple)):
        for index in spec:
            if isinstance(index, bool) or not isinstance(index, int):
                raise ValueError(f"layer indices must be integers; got {index!r}")
        return list(spec)
    raise ValueError(f'layers must be None, "all" or a list of layer indices; got {spec!r}')


def resolve_layers(layers: None | str | Iterable[int], default: str, num_layers: int) -> list[int]:
    """None -> the variant's paper default ("first" or "all"); "all"; or explicit indices in [0, num_layers)."""
    if not (layers is None or isinstance(layers, (str, list, tuple))):
        try:
            layers = list(layers)
        except TypeError:
            raise ValueError(f'layers must be None, "all" or a list of layer indices; got {layers!r}') from None
    layers = parse_layer_spec(layers)
    if layers is None:
        layers = [0] if default == "first" else "all"
    if layers == "all":
        return list(range(num_layers))
    if not layers:
        raise ValueError("layers is an empty list; give at least one layer index, \"all\" or None")
    for index in layers:
        if not 0 <= index < num_layers:
            raise ValueError(
                f"layer index {index} is out of range: this model has {num_layers} attention layers (0..{num_layers - 1})"
            )
    return sorted(set(layers))


_LEFT_PADDING_WARNED: set[str] = set()


def warn_left_padding_without_positions(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook for variants whose scores are not shift-invariant (neural's MLP sees rotated or position-added
    vectors, unlike a dot product): a left-padded batch without position_ids numbers each padded row's tokens from the
    padding on, so a row's output differs from the same row alone (by about 2e-3 on a tiny Llama). `generate` passes
    position_ids, so generation is unaffected; pass position_ids = cumsum(attention_mask) - 1 in a forward call."""
    mask = kwargs.get("attention_mask")
    if mask is None or kwargs.get("position_ids") is not None or mask.dim() != 2 or mask.shape[1] < 2:
        return
    if bool(((mask[:, 0] == 0) & (mask[:, -1] != 0)).any()) and type(model).__name__ not in _LEFT_PADDING_WARNED:
        _LEFT_PADDING_WARNED.add(type(model).__name__)
        logger.warning(
            "%s: a left-padded batch reached a 'neural' attention layer without position_ids; its learned score is "
            "not shift-invariant, so padded rows differ from the same rows alone. Pass position_ids "
            "(attention_mask.cumsum(-1) - 1, as generate does).", type(model).__name__)


def _base_implementation(model: nn.Module) -> str:
    """The stock implementation untouched layers keep: eager stays eager, everything else runs through SDPA
    (flash and flex kernels take masks in other formats than the variants' boolean one)."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if current not in ("eager", "sdpa"):
        logger.warning("layers left untouched by convert() run %r attention through SDPA instead", current)
        return "sdpa"
    return current


def refuse_unsupported_features(modules: list[tuple[str, nn.Module]]) -> None:
    """Refuses, before anything changes, a model whose attention modules change their weights in a way no variant
    implements: Gemma 2's logit soft-capping (its stock config sets attn_logit_softcapping=50.0) and learned attention
    sinks. Otherwise the model would convert and then raise on its first forward (every layer, converted or not, runs
    through the variant's attention function, which refuses these arguments)."""
    for name, module in modules:
        cap = getattr(module, "attn_logit_softcapping", None)
        if cap is not None:
            raise ValueError(
                f"{type(module).__name__} ({name}) caps its attention logits (attn_logit_softcapping={cap!r}), which no "
                "attention variant implements. Set attn_logit_softcapping=None in the config before the model is built "
                "(e.g. Gemma2Config(..., attn_logit_softcapping=None), or from_pretrained(..., "
                "attn_logit_softcapping=None)), then convert; the model's outputs change accordingly."
            )
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, nn.Parameter):
            raise ValueError(
                f"{type(module).__name__} ({name}) has learned attention sinks (`sinks`), which no attention variant "
                "implements, so it cannot be converted."
            )


def apply_variant(
    model: nn.Module, variant: str, layers: None | str | Iterable[int] = None, **options: Any
) -> list[int]:
    """Injects the variant's parameters into the targeted attention modules and records the choice on the config.

    Keeps every existing weight. Returns the targeted layer indices. Does not switch the attention implementation.
    """
    return apply_checked_variant(model, variant, layers, variant_class(variant).check_options(options))


def apply_checked_variant(model: nn.Module, variant: str, layers: None | str | Iterable[int],
                          checked: dict[str, Any]) -> list[int]:
    """`apply_variant` with options its variant's `check_options` returned (a variant config checked them when it was
    created); the modules are built from them without checking again."""
    cls = variant_class(variant)
    modules = find_attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention module that dispatches through Transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS.get_interface), so no variant can be plugged in"
        )
    if any(hasattr(module, VARIANT_ATTRIBUTE) for _, module in modules):
        raise ValueError(f"{type(model).__name__} is already converted to an attention variant")
    refuse_unsupported_features(modules)
    targets = resolve_layers(layers, cls.default_layers, len(modules))
    base = _base_implementation(model)
    config = getattr(model, "config", None)

    # Build every variant module before touching the model, so a bad option leaves it unchanged.
    variant_modules = {}
    for index in targets:
        module = modules[index][1]
        num_heads, head_dim = attention_geometry(module, config)
        variant_module = cls.from_checked_options(num_heads, head_dim, checked)
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

    if not cls.shift_invariant:
        handle = model.register_forward_pre_hook(warn_left_padding_without_positions, with_kwargs=True)
        model.__dict__[HOOK_ATTRIBUTE] = handle  # removed by revert
    if config is not None:
        config.attention_variant = variant
        config.attention_variant_options = resolved_options
        config.attention_variant_layers = targets
    return targets
