"""hf-neural-attention: Neural, Expressive and CDAPE attention as Transformers attention implementations.

    import hf_neural_attention as hfna
    model = hfna.convert(model, "cdape", kernel_size=3)

Importing the package registers the variants "dot", "expressive", "neural" and "cdape" with Transformers'
AttentionInterface and AttentionMaskInterface.
"""

from .cdape import CDAPEAttention
from .dot import DotProductAttention
from .expressive import ExpressiveAttention
from .integration import (
    VARIANTS,
    apply_variant,
    convert,
    find_attention_modules,
    register_variants,
    variant_attention_forward,
    variant_option_names,
)
from .neural import NeuralAttention

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "CDAPEAttention",
    "DotProductAttention",
    "ExpressiveAttention",
    "NeuralAttention",
    "apply_variant",
    "convert",
    "find_attention_modules",
    "register_variants",
    "variant_attention_forward",
    "variant_option_names",
]
