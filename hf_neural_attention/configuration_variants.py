"""Configs with an attention variant: any stock Transformers config plus the variant fields.

    attention_variant          one of "dot", "expressive", "neural", "cdape"
    attention_variant_options  the variant's keyword options (resolved defaults are written back on conversion)
    attention_variant_layers   None (the variant's paper default), "all", or attention-layer indices
    retrofitted_from           the stock checkpoint a retrofit started from (the model card's base_model)

`variant_config_class(Qwen2Config)` builds `VariantQwen2Config` (model type "variant_qwen2") on first use, so no
architecture needs a hand-written class; GPT-2, Llama and ViT keep named classes (Llama adds use_rotary_embeddings).
A checkpoint's `auto_map` names the class ("configuration_variants.VariantQwen2Config"); the module-level
`__getattr__` below rebuilds it from the name where this file runs as a checkpoint's remote code.

Transformers does not save `_attn_implementation`, so the variant lives in these fields, the model classes re-apply it
on every load, and `attn_implementation` is written into config.json too: a stock class that loads the checkpoint
then fails on the unknown implementation instead of silently running stock attention without the variant's weights.
"""

from __future__ import annotations

import copy
from typing import Any

import transformers
from huggingface_hub.dataclasses import strict
from transformers import GPT2Config, LlamaConfig, PretrainedConfig, ViTConfig

from .injection import parse_layer_spec
from .registry import VARIANTS, validate_variant_options

# name: (type, default). The first three are typed Any so that validate_attention_variant, whose errors name the valid
# values, checks them instead of the dataclass' generic type errors.
VARIANT_FIELDS: dict[str, tuple[Any, Any]] = {
    "attention_variant": (Any, "dot"),  # str
    "attention_variant_options": (Any, None),  # dict | None
    "attention_variant_layers": (Any, None),  # list[int] | str | None
    "retrofitted_from": (str | None, None),
}


CHECKED_OPTIONS_KEY = "_checked_attention_variant"  # (variant, options as given, options as checked)

# Called as hook(config_class) whenever a variant config is created. The installed package registers the variant model
# classes of the config's architecture with the Auto classes here (auto_registration.py), so that AutoModel*.from_config
# and from_pretrained build them; a checkpoint's own copy of this file runs without it (trust_remote_code does that).
CREATED_HOOKS: list = []


class VariantConfigMixin:
    """Behaviour shared by every variant config; `stock_config_class` is the config it extends."""

    stock_config_class: type[PretrainedConfig]

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        for hook in CREATED_HOOKS:
            hook(type(self))

    def validate_attention_variant(self) -> None:  # run by @strict at creation: clear errors for bad fields
        checked = validate_variant_options(self.attention_variant, self.attention_variant_options)
        parse_layer_spec(self.attention_variant_layers)
        # kept for the model built from this config, which then does not check them again (not a field: not saved)
        self.__dict__[CHECKED_OPTIONS_KEY] = (
            self.attention_variant, copy.deepcopy(self.attention_variant_options), checked)

    def checked_variant_options(self) -> dict[str, Any] | None:
        """The variant options as checked when this config was created, or None where the variant fields were
        reassigned since (the model then checks them itself)."""
        stamp = self.__dict__.get(CHECKED_OPTIONS_KEY)
        if stamp is None or stamp[:2] != (self.attention_variant, self.attention_variant_options):
            return None
        return stamp[2]

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A stock checkpoint's config read by its own variant class (a retrofit:
        `VariantGPT2LMHeadModel.from_pretrained("gpt2", attention_variant=...)`) is this config's base, not a foreign
        model type: it is read as this model type, so Transformers does not warn that loading it "is not supported".
        Any other model type is left as it is and still warned about."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == cls.stock_config_class.model_type:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def to_dict(self) -> dict[str, Any]:
        output = {**super().to_dict(), "attn_implementation": self.attention_variant}
        output.pop(CHECKED_OPTIONS_KEY, None)
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        output = {**super().to_diff_dict(), "attn_implementation": self.attention_variant}
        output.pop(CHECKED_OPTIONS_KEY, None)
        return output


def share_weight_renaming(stock_name: str, variant_name: str) -> None:
    """Transformers renames the weights of older checkpoint layouts by model type or class name (conversion_mapping):
    the variant's name gets the stock name's renaming, so its checkpoints save and load as the stock model's do."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping)
    except ImportError:  # a Transformers without renaming
        return
    renaming = get_checkpoint_conversion_mapping(stock_name)
    if renaming is not None:
        register_checkpoint_conversion_mapping(variant_name, renaming, overwrite=True)


_CONFIG_CLASSES: dict[type, type] = {}  # stock config class -> its variant config class


def variant_config_class(stock: type[PretrainedConfig], extra_fields: dict[str, tuple[Any, Any]] | None = None) -> type:
    """The variant config class of a stock config class (built once, then cached): `Variant<Stock>`, model type
    `variant_<stock model type>`, the stock fields plus VARIANT_FIELDS (and extra_fields, on first build)."""
    if isinstance(stock, type) and issubclass(stock, VariantConfigMixin):
        return stock
    if stock not in _CONFIG_CLASSES:
        fields = {**VARIANT_FIELDS, **(extra_fields or {})}
        name = f"Variant{stock.__name__}"
        namespace = {
            "__module__": __name__,
            "__qualname__": name,
            "__annotations__": {field: kind for field, (kind, _) in fields.items()},
            **{field: default for field, (_, default) in fields.items()},
            "model_type": f"variant_{stock.model_type}",
            "stock_config_class": stock,
        }
        config_class = strict(type(name, (VariantConfigMixin, stock), namespace))
        config_class.register_for_auto_class("AutoConfig")  # save_pretrained copies this code and writes auto_map
        share_weight_renaming(stock.model_type, config_class.model_type)
        _CONFIG_CLASSES[stock] = config_class
    return _CONFIG_CLASSES[stock]


VariantGPT2Config = variant_config_class(GPT2Config)
# use_rotary_embeddings=False drops rotary embeddings (NoPE), for position-free or bias-only (cdape alibi/kerple) models.
VariantLlamaConfig = variant_config_class(LlamaConfig, extra_fields={"use_rotary_embeddings": (bool, True)})
VariantViTConfig = variant_config_class(ViTConfig)


def stock_class_named(variant_name: str, base: type) -> type | None:
    """The Transformers class a `Variant<Stock>` name stands for, if it is a subclass of `base`; else None."""
    stock = getattr(transformers, variant_name[len("Variant"):], None) if variant_name.startswith("Variant") else None
    return stock if isinstance(stock, type) and issubclass(stock, base) else None


def __getattr__(name: str) -> type:
    """`VariantQwen2Config` and the like, built on first access (how a checkpoint's auto_map reaches them)."""
    stock = stock_class_named(name, PretrainedConfig)
    if stock is not None:
        return variant_config_class(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["VARIANTS", "VARIANT_FIELDS", "VariantConfigMixin", "VariantGPT2Config", "VariantLlamaConfig",
           "VariantViTConfig", "variant_config_class"]
