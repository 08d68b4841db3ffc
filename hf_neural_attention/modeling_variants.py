"""Model classes that apply an attention variant from their config, for every Transformers architecture and head.

`variant_model_class(Qwen2ForSequenceClassification)` builds `VariantQwen2ForSequenceClassification` on first use: the
stock class with `AttentionVariantMixin` first in its bases, which injects the variant's parameters after the stock
`__init__`, loads checkpoints by the rules of loading.py and saves variant checkpoints. No architecture needs a
hand-written class; GPT-2, Llama and ViT keep named ones for imports. `save_pretrained` copies this flat folder's code
into the checkpoint and writes an `auto_map` entry for every Auto class that serves the architecture, and the
module-level `__getattr__` rebuilds any `Variant<Stock>` from its name, so the checkpoint loads with
`trust_remote_code=True` where this package is not installed. The shipped files (this one and every sibling it imports
as `from .x import ...`) import only torch, transformers, huggingface_hub, triton (optional) and each other
(tests/test_shipped_code.py imports each where the package is blocked).

Transformers keeps no public list of the Auto classes that serve a config class: `stock_classes_by_auto_class` reads
each Auto class's `_model_mapping`, the one private attribute the package reads, never at import
(tests/test_auto_registration.py fails with a clear message if Transformers changes it).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import transformers
from transformers import (
    GPT2LMHeadModel,
    GPT2Model,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedModel,
    ViTForImageClassification,
    ViTModel,
)
from transformers.dynamic_module_utils import custom_object_save
from transformers.models.auto import modeling_auto

from .configuration_variants import share_weight_renaming, stock_class_named, variant_config_class
from .attention_interface import register_variants  # noqa: F401 (importing it registers the variants)
from .injection import apply_checked_variant
from .loading import HUB_KWARGS, check_loaded_weights, initialize_new_variant_parameters, retrofit_kwargs
from .nope import drop_rotary_embeddings
from .registry import VARIANTS, variant_class

# Called as hook(model, save_directory, **card_fields) after every save_pretrained. The installed package registers
# its model-card writer here (hub.py); a checkpoint's own copy of this file runs without it and writes no card.
SAVE_HOOKS: list = []

# The loss a head computes, where its class name matches no Transformers loss type (Transformers reads loss_type for
# the model's loss function, and Trainer to count targets: with None it counted position 0 of every row as one).
LOSS_TYPES = {"GPT2LMHeadModel": "ForCausalLM"}


def auto_classes() -> dict[str, type]:
    """Transformers' Auto model classes by name (AutoModel, AutoModelForCausalLM, ...)."""
    return {name: value for name, value in vars(modeling_auto).items()
            if isinstance(value, type) and getattr(value, "_model_mapping", None) is not None}


def stock_classes_by_auto_class(stock_config_class: type) -> dict[str, type]:
    """{Auto class name: the stock model class it builds for this config class}, e.g. for Qwen2Config
    {"AutoModel": Qwen2Model, "AutoModelForCausalLM": Qwen2ForCausalLM, ...}."""
    served = {}
    for name, auto_class in auto_classes().items():
        if stock_config_class in auto_class._model_mapping:
            stock = auto_class._model_mapping[stock_config_class]
            stock = stock[0] if isinstance(stock, (list, tuple)) else stock
            if stock.config_class is stock_config_class:  # (a few entries reach another model type's class by name)
                served[name] = stock
    return served


_REGISTERED: set[type] = set()  # variant config classes whose heads are registered


def register_heads(config_class: type) -> None:
    """Registers the variant class of every head an Auto class serves for this variant config class's architecture
    with that Auto class (Transformers' public `register`). A generic head builds its base model with
    `AutoModel.from_config(config)`, which then builds the variant base model. Keyed by the config class given: in a
    checkpoint's code, the one Transformers loaded the config with lives in another module than this file's import."""
    if config_class in _REGISTERED:
        return
    _REGISTERED.add(config_class)
    autos = auto_classes()
    for auto, stock in stock_classes_by_auto_class(config_class.stock_config_class).items():
        autos[auto].register(config_class, variant_model_class(stock), exist_ok=True)


def auto_map(model_class: type, current: dict | None) -> dict[str, str]:
    """The checkpoint's auto_map: the variant class of every Auto class that serves the architecture (AutoModel
    included), so any head loads from it with trust_remote_code; the AutoConfig entry is kept."""
    served = stock_classes_by_auto_class(model_class.config_class.stock_config_class)
    module = __name__.rpartition(".")[2]
    return {**{auto: f"{module}.Variant{stock.__name__}" for auto, stock in served.items()},
            **{key: value for key, value in (current or {}).items() if key == "AutoConfig"}}


def primary_auto_class(model_class: type) -> str:
    """The Auto class a model card names for this class: AutoModel where it serves it, else the first task class."""
    serving = [auto for auto, stock in stock_classes_by_auto_class(model_class.config_class.stock_config_class).items()
               if stock is model_class.stock_model_class]
    serving.sort(key=lambda auto: (auto == "AutoModelForPreTraining", auto != "AutoModel"))
    return serving[0] if serving else "AutoModel"


def is_transformers_class(cls: type) -> bool:
    """Whether `cls` is reachable as `transformers.<name>`: what a checkpoint's code can rebuild it from."""
    return getattr(transformers, cls.__name__, None) is cls


def refuse_what_no_checkpoint_rebuilds(model_class: type) -> None:
    stock = model_class.stock_model_class
    if not (is_transformers_class(stock) and is_transformers_class(model_class.config_class.stock_config_class)):
        raise ValueError(
            f"{model_class.__name__} cannot be saved as a variant checkpoint: {stock.__module__}.{stock.__name__} is "
            "not a Transformers class, so neither this package nor the checkpoint's code could rebuild it on load. "
            "Save its state_dict with your own class, or hf_neural_attention.revert(model) first.")


class AttentionVariantMixin:
    """Shared by every variant model class; put it first in the bases, before the stock class."""

    stock_model_class: type[PreTrainedModel]

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        register_heads(type(config))  # before a generic head's AutoModel.from_config(config)
        super().__init__(config, *args, **kwargs)
        if getattr(config, "use_rotary_embeddings", True) is False:
            drop_rotary_embeddings(self)
        if not any(module is not self and isinstance(module, AttentionVariantMixin) for module in self.modules()):
            self._apply_attention_variant()  # (a generic head's base model, built by AutoModel, holds it already)
        self.loss_type = LOSS_TYPES.get(self.stock_model_class.__name__, self.loss_type)

    def _apply_attention_variant(self) -> None:
        config = self.config
        if config._attn_implementation in VARIANTS:
            # a variant checkpoint's config names its variant (configuration_variants writes it): the layers the
            # variant leaves untouched run SDPA, as they do in a model converted from a stock one
            config._attn_implementation = "sdpa"
        checked = config.checked_variant_options() if hasattr(config, "checked_variant_options") else None
        if checked is None:  # a stock config, or variant fields reassigned after the config checked them
            checked = variant_class(config.attention_variant).check_options(config.attention_variant_options)
        config.attention_variant_layers = apply_checked_variant(
            self, config.attention_variant, config.attention_variant_layers, checked)
        config._attn_implementation = config.attention_variant  # the setter reaches the sub-configs too

    def set_attn_implementation(self, attn_implementation: str | dict, *args: Any, **kwargs: Any) -> None:
        """Refuses to switch a converted model to another implementation: the config would keep saying the model
        runs its variant while it ran stock attention. Use `hf_neural_attention.revert(model)` for the stock model."""
        variant = getattr(self.config, "attention_variant", None)
        if variant is not None and attn_implementation != variant:
            raise ValueError(
                f"{type(self).__name__} runs attention variant {variant!r}; switching it to {attn_implementation!r} "
                "would leave the config and the weights describing a model that no longer runs. Use "
                "hf_neural_attention.revert(model) to get the stock model back (the variant's weights removed), "
                "then choose its implementation.")
        super().set_attn_implementation(attn_implementation, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """Loads a variant checkpoint, or retrofits a stock one (pass `attention_variant=`, and optionally
        `attention_variant_options=` and `attention_variant_layers=`): only the variant's parameters are new, and
        weights that do not fit raise instead of being dropped or left random (loading.py)."""
        want_info = kwargs.pop("output_loading_info", False)
        source = pretrained_model_name_or_path
        stored, _ = cls.config_class.get_config_dict(source, **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
        model, info = super().from_pretrained(source, *args, output_loading_info=True, **retrofit_kwargs(stored, kwargs))
        new_keys = check_loaded_weights(model, stored, info, source)
        if new_keys:  # a retrofit: the stock weights are loaded, the variant's parameters start from their init
            model.config.retrofitted_from = str(source)  # the model card's base_model
            initialize_new_variant_parameters(model, new_keys)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Stock save with an auto_map for every Auto class of the architecture, this folder's code next to it, then
        the SAVE_HOOKS (the installed package writes a model card README.md)."""
        variant_class = next(cls for cls in type(self).__mro__ if cls.__module__ == __name__)
        if variant_class is not type(self):
            # FSDP2's fully_shard gives a sharded model a subclass defined in torch (FSDPVariant...), whose module
            # custom_object_save would copy and name in auto_map; the checkpoint holds the variant class's code
            wrapper, self.__class__ = type(self), variant_class
            try:
                return self.save_pretrained(save_directory, *args, **kwargs)
            finally:
                self.__class__ = wrapper
        refuse_what_no_checkpoint_rebuilds(type(self))
        self.config.auto_map = auto_map(type(self), getattr(self.config, "auto_map", None))
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            custom_object_save(self, save_directory)  # this flat folder's code (for any head, Auto class or not)
            for hook in SAVE_HOOKS:
                hook(self, save_directory)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "50GB", **card_fields: Any) -> str:
        """Uploads weights, code and model card as one commit through huggingface_hub's public API (Transformers'
        version writes a generic card over the saved one). Extra keyword arguments (datasets, metrics, ...) go to the
        card."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            for hook in SAVE_HOOKS if card_fields else ():
                hook(self, folder, **card_fields)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                       revision=revision, create_pr=create_pr)
        return commit.pr_url if create_pr else commit.commit_url


_MODEL_CLASSES: dict[type, type] = {}  # stock model class -> its variant class


def variant_model_class(stock: type[PreTrainedModel]) -> type:
    """The variant class of a stock model class (built once, then cached): `Variant<Stock>`, with
    AttentionVariantMixin first in its bases and the variant config class of the stock config class."""
    if issubclass(stock, AttentionVariantMixin):
        return stock
    if stock not in _MODEL_CLASSES:
        name = f"Variant{stock.__name__}"
        model_class = type(name, (AttentionVariantMixin, stock), {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{stock.__name__} whose attention layers run the variant named by the config.",
            "config_class": variant_config_class(stock.config_class),
            "stock_model_class": stock,
        })
        share_weight_renaming(stock.__name__, name)
        _MODEL_CLASSES[stock] = model_class
    return _MODEL_CLASSES[stock]


VariantGPT2Model = variant_model_class(GPT2Model)
VariantGPT2LMHeadModel = variant_model_class(GPT2LMHeadModel)
VariantLlamaModel = variant_model_class(LlamaModel)
VariantLlamaForCausalLM = variant_model_class(LlamaForCausalLM)
VariantViTModel = variant_model_class(ViTModel)
VariantViTForImageClassification = variant_model_class(ViTForImageClassification)


def __getattr__(name: str) -> type:
    """`VariantQwen2ForCausalLM` and the like, built on first access (how a checkpoint's auto_map reaches them)."""
    stock = stock_class_named(name, PreTrainedModel)
    if stock is not None:
        return variant_model_class(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
