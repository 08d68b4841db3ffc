"""Configs for GPT-2, Llama and ViT with an attention variant: the stock config plus three fields.

    attention_variant          one of "dot", "expressive", "neural", "cdape"
    attention_variant_options  the variant's keyword options (resolved defaults are written back on conversion)
    attention_variant_layers   None (the variant's paper default), "all", or attention-layer indices

Transformers does not save `_attn_implementation`, so the variant lives in these fields and the model classes
re-apply it on every load.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config, LlamaConfig, ViTConfig

from .integration import VARIANTS, variant_class, variant_option_names


def validate_variant_fields(config: Any) -> None:
    """Clear errors for a bad variant, option name or layers value, at config creation."""
    variant_class(config.attention_variant)  # raises with the valid names
    options = config.attention_variant_options or {}
    if not isinstance(options, dict):
        raise ValueError(f"attention_variant_options must be a dict; got {options!r}")
    valid = variant_option_names(config.attention_variant)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for attention variant {config.attention_variant!r}; "
            f"valid options are {valid or 'none'}"
        )
    layers = config.attention_variant_layers
    if not (layers is None or layers == "all" or isinstance(layers, (list, tuple))):
        raise ValueError(f'attention_variant_layers must be None, "all" or a list of layer indices; got {layers!r}')


@strict
class VariantGPT2Config(GPT2Config):
    model_type = "variant_gpt2"

    attention_variant: str = "dot"
    attention_variant_options: dict | None = None
    attention_variant_layers: list[int] | str | None = None
    retrofitted_from: str | None = None  # the stock checkpoint a retrofit started from (model card base_model)

    def validate_attention_variant(self):
        validate_variant_fields(self)


@strict
class VariantLlamaConfig(LlamaConfig):
    model_type = "variant_llama"

    attention_variant: str = "dot"
    attention_variant_options: dict | None = None
    attention_variant_layers: list[int] | str | None = None
    retrofitted_from: str | None = None  # the stock checkpoint a retrofit started from (model card base_model)
    # False drops rotary embeddings (NoPE), for position-free or bias-only (cdape alibi/kerple) models.
    use_rotary_embeddings: bool = True

    def validate_attention_variant(self):
        validate_variant_fields(self)


@strict
class VariantViTConfig(ViTConfig):
    model_type = "variant_vit"

    attention_variant: str = "dot"
    attention_variant_options: dict | None = None
    attention_variant_layers: list[int] | str | None = None
    retrofitted_from: str | None = None  # the stock checkpoint a retrofit started from (model card base_model)

    def validate_attention_variant(self):
        validate_variant_fields(self)


VARIANT_CONFIGS = (VariantGPT2Config, VariantLlamaConfig, VariantViTConfig)

__all__ = ["VARIANTS", "VariantGPT2Config", "VariantLlamaConfig", "VariantViTConfig", "VARIANT_CONFIGS"]
