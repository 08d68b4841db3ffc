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

from .injection import parse_layer_spec
from .registry import VARIANTS, validate_variant_options


def validate_variant_fields(config: Any) -> None:
    """Clear errors for a bad variant, option or layers value, at config creation."""
    validate_variant_options(config.attention_variant, config.attention_variant_options)
    parse_layer_spec(config.attention_variant_layers)


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
