"""How Transformers' Auto classes find the variant classes: through their public `register(..., exist_ok=True)`.

With the package imported,
- AutoConfig knows the named variant configs (model types variant_gpt2, variant_llama, variant_vit) from import on,
  and every architecture that `convert` or `register_architecture` has seen;
- creating a variant config registers the variant class of every head of its architecture with the Auto class that
  serves it (modeling_variants.register_heads), so `AutoModel*.from_pretrained` and `from_config` build them.

A checkpoint of another architecture (say variant_qwen2) in a fresh process therefore needs one of:
`hf_neural_attention.register_architecture("qwen2")` first; `trust_remote_code=True` (the checkpoint's own code); or
the opt-in `find_every_architecture()`. Registering a variant config for each of Transformers' model types at import
would import every configuration module (seconds, on every import), and AutoConfig has no public hook that answers
for keys it was not given, so that opt-in swaps AutoConfig's private table of registered extras
(`CONFIG_MAPPING._extra_content`) for a dict that builds the entry on lookup. It refuses with a clear error where that
table has changed, and tests/test_auto_registration.py checks the Transformers internals it relies on.

Installed-package API: a checkpoint's own code is reached through its auto_map instead and does not need this.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_variants import (CREATED_HOOKS, VariantConfigMixin, VariantGPT2Config, VariantLlamaConfig,
                                     VariantViTConfig, variant_config_class)
from .modeling_variants import register_heads

PREFIX = "variant_"
NAMED = (VariantGPT2Config, VariantLlamaConfig, VariantViTConfig)


def register_config(config_class: type[VariantConfigMixin]) -> None:
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


def register_architecture(stock: str | type) -> type:
    """Lets the Auto classes load variant checkpoints of one architecture, named by its stock model type ("qwen2") or
    config class: registers Variant<Config> with AutoConfig and every variant head with its Auto class. Returns the
    variant config class."""
    stock_config = CONFIG_MAPPING[stock] if isinstance(stock, str) else stock
    config_class = variant_config_class(stock_config)
    register_config(config_class)
    register_heads(config_class)
    return config_class


def install() -> None:
    """What importing the package does (public API only): the named configs, and the heads of every variant config
    once it is created."""
    for config_class in NAMED:
        register_config(config_class)
    if register_heads not in CREATED_HOOKS:
        CREATED_HOOKS.append(register_heads)


class VariantConfigEntries(dict):
    """AutoConfig's registered extras, plus "variant_<stock model type>" entries built and registered on lookup."""

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or self._derive(key) is not None

    def __missing__(self, key: Any) -> Any:
        value = self._derive(key)
        if value is None:
            raise KeyError(key)
        return value

    def _derive(self, key: Any) -> type | None:
        if not (isinstance(key, str) and key.startswith(PREFIX) and key[len(PREFIX):] in CONFIG_MAPPING):
            return None
        config_class = variant_config_class(CONFIG_MAPPING[key[len(PREFIX):]])
        self[key] = config_class
        return config_class


def find_every_architecture() -> None:
    """Opt-in: AutoConfig (and through it every Auto class) finds the variant config of any architecture by its model
    type, without naming the architecture first. Relies on a private Transformers table (see the module docstring)."""
    extras = getattr(CONFIG_MAPPING, "_extra_content", None)
    if not isinstance(extras, dict):
        raise RuntimeError(
            f"find_every_architecture relies on AutoConfig's CONFIG_MAPPING._extra_content being a dict, which "
            f"Transformers {transformers.__version__} changed. Call hf_neural_attention.register_architecture("
            "'<model type>') for the architectures you load, or load with trust_remote_code=True.")
    if not isinstance(extras, VariantConfigEntries):
        CONFIG_MAPPING._extra_content = VariantConfigEntries(extras)
