"""hf-neural-attention: Neural, Expressive and CDAPE attention as Transformers attention implementations.

    import hf_neural_attention as hfna
    model = hfna.convert(model, "cdape", kernel_size=3)

Importing the package registers the variants "dot", "expressive", "neural" and "cdape" with Transformers'
AttentionInterface and AttentionMaskInterface, and the Variant* config and model classes with the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
)

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
    VARIANT_MODEL_CLASSES,
    VariantGPT2LMHeadModel,
    VariantGPT2Model,
    VariantLlamaForCausalLM,
    VariantLlamaModel,
    VariantViTForImageClassification,
    VariantViTModel,

)
from .conversion import convert, revert
from .neural import NeuralAttention

__version__ = "0.1.0"

_AUTO_CLASSES = {
    "AutoModel": AutoModel,
    "AutoModelForCausalLM": AutoModelForCausalLM,
    "AutoModelForImageClassification": AutoModelForImageClassification,
}
for _config_class in (VariantGPT2Config, VariantLlamaConfig, VariantViTConfig):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
for _, _model_class, _auto_name in VARIANT_MODEL_CLASSES:
    _AUTO_CLASSES[_auto_name].register(_model_class.config_class, _model_class, exist_ok=True)

__all__ = [
    "FAST_PATHS",
    "VARIANTS",
    "VARIANT_CLASSES",
    "AttentionVariant",
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
    "parse_layer_spec",
    "register_variants",
    "variant_attention_forward",
    "validate_variant_options",
    "variant_option_names",
    "write_model_card",
]
