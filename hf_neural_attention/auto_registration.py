"""Lets Transformers' Auto classes find the variant class of every architecture, built on first use.

`AutoConfig.register` and `AutoModel*.register` take one class at a time, and building a variant class for each of the
~450 architectures at import would import them all. Instead each Auto mapping's table of registered extras (its
`_extra_content` dict) is swapped for `VariantEntries`, a dict that also answers for keys it has not seen: the model
type "variant_qwen2" (AutoConfig) or the config class `VariantQwen2Config` (Auto model classes), building the variant
class from the stock entry on first lookup. Stock keys are answered as before.

Installed-package API: a checkpoint's own code is reached through its auto_map instead and does not need this.
"""

from __future__ import annotations

from typing import Any, Callable

from transformers.models.auto import configuration_auto, modeling_auto

from .configuration_variants import VariantConfigMixin, variant_config_class
from .modeling_variants import variant_model_class

PREFIX = "variant_"


class VariantEntries(dict):
    """A mapping's registered extras, plus the variant entries that `build(key)` derives on first lookup (None: no
    variant entry for this key)."""

    def __init__(self, registered: dict, build: Callable[[Any], Any]) -> None:
        super().__init__(registered)
        self.build = build

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or self._derive(key) is not None

    def __missing__(self, key: Any) -> Any:
        value = self._derive(key)
        if value is None:
            raise KeyError(key)
        return value

    def _derive(self, key: Any) -> Any:
        try:
            value = self.build(key)
        except KeyError:
            return None
        if value is not None:
            self[key] = value
        return value


def _variant_config_for(model_type: Any) -> type | None:
    """AutoConfig's entry for "variant_<stock model type>"."""
    if not isinstance(model_type, str) or not model_type.startswith(PREFIX):
        return None
    stock_type = model_type[len(PREFIX):]
    if stock_type not in configuration_auto.CONFIG_MAPPING:
        return None
    return variant_config_class(configuration_auto.CONFIG_MAPPING[stock_type])


def _variant_models_for(mapping) -> Callable[[Any], Any]:
    """An Auto model mapping's entry for a variant config class: the variant of the stock class it maps to."""

    def build(config_class: Any) -> Any:
        if not (isinstance(config_class, type) and issubclass(config_class, VariantConfigMixin)):
            return None
        stock_config = config_class.stock_config_class
        if stock_config not in mapping:
            return None
        stock = mapping[stock_config]
        if isinstance(stock, (list, tuple)):
            return type(stock)(variant_model_class(cls) for cls in stock)
        return variant_model_class(stock)

    return build


def install() -> None:
    """Swaps the extras of AutoConfig's mapping and of every Auto model mapping for VariantEntries (idempotent)."""
    config_mapping = configuration_auto.CONFIG_MAPPING
    if not isinstance(config_mapping._extra_content, VariantEntries):
        config_mapping._extra_content = VariantEntries(config_mapping._extra_content, _variant_config_for)
    for auto_class in modeling_auto.__dict__.values():
        mapping = getattr(auto_class, "_model_mapping", None) if isinstance(auto_class, type) else None
        if mapping is not None and not isinstance(mapping._extra_content, VariantEntries):
            mapping._extra_content = VariantEntries(mapping._extra_content, _variant_models_for(mapping))
