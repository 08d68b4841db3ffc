"""What a variant model class does with the weights a checkpoint holds (AttentionVariantMixin.from_pretrained):

- asked for another variant than the checkpoint's without naming layers, a retrofit starts from that variant's
  paper default layers, not from the layer list the checkpoint resolved for its own variant;
- weights the model has no place for raise (a base model ignores a head's weights, as Transformers does);
- stock weights the checkpoint lacks are reported; variant weights it lacks start from the variant's own init (a
  retrofit), unless the checkpoint's config says that layer already holds this variant: then it raises.

Each rule is a small function of names and config fields; `check_loaded_weights` applies them to a loaded model.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from .injection import VARIANT_ATTRIBUTE, find_attention_modules
from .variant import AttentionVariant

logger = logging.getLogger(__name__)

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def preview(keys: list[str], limit: int = 10) -> str:
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def is_variant_weight(key: str) -> bool:
    return f".{VARIANT_ATTRIBUTE}." in f".{key}"


def retrofit_kwargs(stored: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained's keyword arguments, with attention_variant_layers=None (the paper default of the variant asked
    for) where another variant than the stored one is asked for without layers or a config: the checkpoint's layer
    list was resolved for its own variant (dot: every layer; neural's default is the first)."""
    if ("attention_variant" in kwargs and "attention_variant_layers" not in kwargs and "config" not in kwargs
            and stored.get("attention_variant") != kwargs["attention_variant"]):
        return {**kwargs, "attention_variant_layers": None}
    return kwargs


def head_weights(unexpected: Iterable[str], base_children: Iterable[str]) -> list[str]:
    """The unexpected weights a base model ignores: those under none of its own modules (a head's)."""
    children = set(base_children)
    return [key for key in unexpected if key.split(".", 1)[0] not in children]


def lost_variant_weights(stored: dict[str, Any], variant: str, attention_names: list[str],
                         missing_variant: Iterable[str]) -> list[str]:
    """Missing variant weights of layers that the checkpoint's config says hold this variant (None: every layer)."""
    if stored.get("attention_variant") != variant:
        return []
    layers = stored.get("attention_variant_layers")
    return sorted(key for key in missing_variant for index, name in enumerate(attention_names)
                  if key.startswith(f"{name}.{VARIANT_ATTRIBUTE}.") and (layers is None or index in layers))


def check_loaded_weights(model: nn.Module, stored: dict[str, Any], info: dict[str, Any], source: Any) -> set[str]:
    """Applies the rules above to a loaded model; returns the variant weights the checkpoint lacked (to initialise)."""
    unexpected = sorted(info["unexpected_keys"])
    if getattr(model, "base_model", None) is model:
        ignored = head_weights(unexpected, dict(model.named_children()))
        if ignored:
            logger.info("%s: ignoring the head weights of %s: %s", type(model).__name__, source, preview(ignored))
        unexpected = [key for key in unexpected if key not in ignored]
    variant = model.config.attention_variant
    if unexpected:
        raise ValueError(
            f"The checkpoint at {source} does not fit {type(model).__name__} (attention variant {variant!r}): it "
            f"holds weights the model has no place for, which would be dropped: {preview(unexpected)}. Check the "
            "architecture, the variant and its options; a variant checkpoint loads only with the variant and "
            "options it was saved with.")
    missing = sorted(key for key in info["missing_keys"] if not is_variant_weight(key))
    if missing:
        logger.warning("%s: the checkpoint at %s lacks these stock weights, which start from a random init: %s",
                       type(model).__name__, source, preview(missing))
    new = {key for key in info["missing_keys"] if is_variant_weight(key)}
    lost = lost_variant_weights(stored, variant, [name for name, _ in find_attention_modules(model)], new)
    if lost:
        raise ValueError(
            f"The checkpoint at {source} says its attention layers {stored.get('attention_variant_layers')} hold "
            f"the {variant!r} variant, but it lacks that variant's weights: {preview(lost)}. The file is incomplete "
            "or was saved by other code; re-initialising them would load a different model. To retrofit a stock "
            "checkpoint, load one without a variant (or pass another attention_variant).")
    return new


@torch.no_grad()
def initialize_new_variant_parameters(model: nn.Module, new_keys: set[str]) -> None:
    """Runs each variant module's own init (zero-initialised output layers included) where the checkpoint had none of
    its parameters. Done after loading because Transformers initialises missing weights through the innermost
    PreTrainedModel's `_init_weights` (the stock code), which does not know these modules."""
    for name, module in model.named_modules():
        if isinstance(module, AttentionVariant):
            keys = {f"{name}.{parameter_name}" for parameter_name, _ in module.named_parameters()}
            if keys & new_keys:
                module.reset_parameters()
