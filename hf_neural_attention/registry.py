"""The registry of variants: one line per variant. Adding a fifth variant is one file (a subclass of
`AttentionVariant`) and one entry here.
"""

from __future__ import annotations

from typing import Any, Mapping

from .cdape import CDAPEAttention
from .dot import DotProductAttention
from .expressive import ExpressiveAttention
from .neural import NeuralAttention
from .variant import AttentionVariant

VARIANT_CLASSES: dict[str, type[AttentionVariant]] = {
    cls.name: cls for cls in (DotProductAttention, ExpressiveAttention, NeuralAttention, CDAPEAttention)
}
VARIANTS: tuple[str, ...] = tuple(VARIANT_CLASSES)


def variant_class(variant: str) -> type[AttentionVariant]:
    if not isinstance(variant, str) or variant not in VARIANT_CLASSES:
        raise ValueError(f"Unknown attention variant {variant!r}; valid variants are {list(VARIANTS)}")
    return VARIANT_CLASSES[variant]


def variant_option_names(variant: str) -> list[str]:
    """The keyword options a variant accepts."""
    return list(variant_class(variant).options_spec)


def validate_variant_options(variant: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Checks a variant's option names and values (the one check shared by convert, the configs and the recipes);
    returns the options as a dict, normalised."""
    return variant_class(variant).check_options(options)


def build_variant(variant: str, num_heads: int, head_dim: int, **options: Any) -> AttentionVariant:
    return variant_class(variant)(num_heads, head_dim, **options)
