"""hf-neural-attention: Neural, Expressive and CDAPE attention as Transformers attention implementations.

    import hf_neural_attention as hfna
    model = hfna.convert(model, "cdape", kernel_size=3)

Importing the package registers the variants "dot", "expressive", "neural" and "cdape" with Transformers'
AttentionInterface and AttentionMaskInterface, and the Variant* config and model classes with the Auto classes
(auto_registration.py says which architectures the Auto classes then find).
"""

from .attention_interface import register_variants, variant_attention_forward
from .cdape import CDAPEAttention
from .configuration_variants import VariantGPT2Config, VariantLlamaConfig, VariantViTConfig
from .dot import DotProductAttention
from .expressive import ExpressiveAttention
from .injection import apply_variant, find_attention_modules, parse_layer_spec
from .registry import VARIANT_CLASSES, VARIANTS, build_variant, validate_variant_options, variant_option_names
from .runtime import FAST_PATHS, FastPathSettings, fast_paths
from .variant import AttentionVariant, Option
from .hub import build_model_card, write_model_card
from .modeling_variants import (
    AttentionVariantMixin,
    VariantGPT2LMHeadModel,
    VariantGPT2Model,
    VariantLlamaForCausalLM,
    VariantLlamaModel,
    VariantViTForImageClassification,
    VariantViTModel,
    variant_model_class,
)
from .configuration_variants import VariantConfigMixin, variant_config_class
from . import auto_registration
from .auto_registration import find_every_architecture, register_architecture
from .conversion import convert, revert
from .neural import NeuralAttention

__version__ = "0.1.0"

auto_registration.install()  # AutoConfig / AutoModel* find the Variant<Stock> classes (public register)

__all__ = [
    "FAST_PATHS",
    "VARIANTS",
    "VARIANT_CLASSES",
    "AttentionVariant",
    "AttentionVariantMixin",
    "VariantConfigMixin",
    "FastPathSettings",
    "Option",
    "build_variant",
    "CDAPEAttention",
    "DotProductAttention",
    "ExpressiveAttention",
    "NeuralAttention",
    "VariantGPT2Config",
    "VariantGPT2LMHeadModel",
    "VariantGPT2Model",
    "VariantLlamaConfig",
    "VariantLlamaForCausalLM",
    "VariantLlamaModel",
    "VariantViTConfig",
    "VariantViTForImageClassification",
    "VariantViTModel",
    "apply_variant",
    "build_model_card",
    "convert",
    "revert",
    "fast_paths",
    "find_attention_modules",
    "find_every_architecture",
    "parse_layer_spec",
    "register_architecture",
    "register_variants",
    "variant_attention_forward",
    "variant_config_class",
    "variant_model_class",
    "validate_variant_options",
    "variant_option_names",
    "write_model_card",
]
