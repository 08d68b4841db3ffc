"""`convert` a loaded Transformers model to an attention variant, and `revert` it to the stock model.

Installed-package API (a checkpoint's code does not need it): the model classes re-apply a saved variant themselves.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Iterable

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .auto_registration import register_architecture
from .configuration_variants import VariantConfigMixin
from .injection import FALLBACK_ATTRIBUTE, HOOK_ATTRIBUTE, VARIANT_ATTRIBUTE, apply_variant, find_attention_modules
from .modeling_variants import AttentionVariantMixin, is_transformers_class, variant_model_class

logger = logging.getLogger(__name__)

VARIANT_CONFIG_FIELDS = ("attention_variant", "attention_variant_options", "attention_variant_layers",
                         "retrofitted_from", "use_rotary_embeddings")
BASE_ATTRIBUTE = "_attention_variant_base"  # the stock implementation the model ran before convert (not saved)


def convert(model: nn.Module, variant: str, layers: None | str | Iterable[int] = None, **options: Any) -> nn.Module:
    """Turns a loaded Transformers model into one whose targeted attention layers use `variant`.

    Args:
        model: GPT-2, Llama or ViT (base or head model), or any model whose attention modules call
            `ALL_ATTENTION_FUNCTIONS.get_interface(...)`.
        variant: one of "dot", "expressive", "neural", "cdape".
        layers: None for the variant's paper default (neural: first layer; others: all), "all", or attention-layer
            indices. Untouched layers keep the implementation they had.
        **options: the variant's options (see README).

    Returns the same object, converted in place with every existing weight kept. A Transformers model becomes an
    instance of its Variant<Stock> class (its config of Variant<StockConfig>), so it saves as a variant checkpoint
    that `AutoModel*.from_pretrained` restores (with `trust_remote_code=True` where this package is not installed).
    A PreTrainedModel that is not a Transformers class converts in memory but cannot be saved as a checkpoint.
    The model gets its own copy of its config: other models built from the same config object stay as they were.
    """
    variant_class = _variant_class_for(model)
    base = getattr(getattr(model, "config", None), "_attn_implementation", None)
    share_again = _use_own_config(model)
    try:
        targets = apply_variant(model, variant, layers, **options)
    except Exception:
        share_again()  # a failed convert leaves the model as it was
        raise
    setattr(model, BASE_ATTRIBUTE, base if base in ("eager", "sdpa") else "sdpa")
    if getattr(model.config, "name_or_path", None):
        model.config.retrofitted_from = model.config.name_or_path
    if variant_class is not None:
        model.config.__class__ = variant_class.config_class  # same fields plus the variant ones
        model.__class__ = variant_class
        register_architecture(variant_class.config_class.stock_config_class)  # its checkpoints load through Auto*
    model.config.attention_variant_layers = targets
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(variant)
    else:
        model.config._attn_implementation = variant
    return model


def _use_own_config(model: nn.Module) -> Callable[[], None]:
    """Points the model and every submodule holding its config (or one of its sub-configs) at one deep copy, so the
    class and fields convert changes are not seen by other models built from the same config object. Returns what
    points them back at the shared objects."""
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        return lambda: None
    copies: dict[int, Any] = {}  # id(original) -> its copy, for the config and every object inside it
    copy.deepcopy(config, copies)
    replaced = [(module, name, value) for module in model.modules() for name, value in vars(module).items()
                if isinstance(value, PretrainedConfig) and id(value) in copies]
    for module, name, value in replaced:
        setattr(module, name, copies[id(value)])

    def share_again() -> None:
        for module, name, value in replaced:
            setattr(module, name, value)

    return share_again


def _variant_class_for(model: nn.Module) -> type | None:
    """The class a converted model takes (None: a plain nn.Module keeps its class); refuses what could not round-trip
    through a checkpoint before anything is changed."""
    if not isinstance(model, PreTrainedModel) or isinstance(model, AttentionVariantMixin):
        return None
    stock = type(model)
    if type(model.config) is not stock.config_class:
        raise ValueError(
            f"{stock.__name__} holds a {type(model.config).__name__} but declares config_class "
            f"{stock.config_class.__name__}; a converted checkpoint is rebuilt from config_class, so it would not "
            "load as this model. Build the model from its own config class first."
        )
    if not is_transformers_class(stock):
        logger.warning("%s is not a Transformers class: it is converted in memory, but save_pretrained will refuse "
                       "(a checkpoint could not rebuild it)", stock.__name__)
    return variant_model_class(stock)


def revert(model: nn.Module) -> nn.Module:
    """The stock model back, in place: every variant module (and its weights) removed, the stock model and config
    classes restored, the variant fields dropped from the config, and the stock implementation selected (the one the
    model ran before `convert`, else SDPA). Outputs then equal the stock model's with the same weights.

    A Llama converted without rotary embeddings (use_rotary_embeddings=False) cannot be reverted: its rotary module
    was replaced.
    """
    config = getattr(model, "config", None)
    if getattr(config, "use_rotary_embeddings", True) is False:
        raise ValueError("this model was built without rotary embeddings (use_rotary_embeddings=False); its stock "
                         "counterpart has them, so it cannot be reverted")
    modules = [module for _, module in find_attention_modules(model)
               if hasattr(module, VARIANT_ATTRIBUTE) or hasattr(module, FALLBACK_ATTRIBUTE)]
    if not modules:
        raise ValueError(f"{type(model).__name__} is not converted to an attention variant; nothing to revert")
    for module in modules:
        if hasattr(module, VARIANT_ATTRIBUTE):
            delattr(module, VARIANT_ATTRIBUTE)
        if hasattr(module, FALLBACK_ATTRIBUTE):
            delattr(module, FALLBACK_ATTRIBUTE)
    base = getattr(model, BASE_ATTRIBUTE, None) or "sdpa"
    if isinstance(model, AttentionVariantMixin):
        model.__class__ = type(model).stock_model_class
    if isinstance(config, VariantConfigMixin):
        config.__class__ = type(config).stock_config_class
    if config is not None:
        for field in VARIANT_CONFIG_FIELDS:
            config.__dict__.pop(field, None)
        config.__dict__.pop("auto_map", None)  # it pointed at the variant classes' code
    if hasattr(model, BASE_ATTRIBUTE):
        delattr(model, BASE_ATTRIBUTE)
    hook = model.__dict__.pop(HOOK_ATTRIBUTE, None)
    if hook is not None:
        hook.remove()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(base)
    return model
