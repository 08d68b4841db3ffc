"""Model classes that apply an attention variant from their config, for every Transformers architecture and head.

`variant_model_class(Qwen2ForSequenceClassification)` builds `VariantQwen2ForSequenceClassification` on first use: the
stock class with `AttentionVariantMixin` first in its bases, which (1) injects the variant's parameters after the
stock `__init__`, (2) initialises exactly those parameters when a stock checkpoint is loaded, (3) refuses checkpoints
that do not fit, and (4) writes a model card next to every save. No architecture needs a hand-written class; GPT-2,
Llama and ViT keep named ones for imports. `save_pretrained` copies this flat folder's code into the checkpoint and
writes an `auto_map` entry for every Auto class that serves the architecture (AutoModel included), and the
module-level `__getattr__` rebuilds any `Variant<Stock>` from its name, so the checkpoint loads with
`trust_remote_code=True` where this package is not installed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch
import transformers
from torch import nn
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
from .injection import apply_variant, find_attention_modules
from .registry import VARIANTS
from .variant import AttentionVariant

logger = logging.getLogger(__name__)


def _preview(keys: list[str], limit: int = 10) -> str:
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class NoRotaryEmbedding(nn.Module):
    """Stands in for a rotary embedding module and returns the identity rotation (cos = 1, sin = 0): NoPE."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*position_ids.shape, self.head_dim)  # [B, L, head_dim]
        return torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device)


@torch.no_grad()
def _initialize_new_variant_parameters(model: nn.Module, new_keys: set[str]) -> None:
    """Runs each variant module's own init (zero-initialised output layers included) where the checkpoint had none of
    its parameters. Done after loading because Transformers initialises missing weights through the innermost
    PreTrainedModel's `_init_weights` (the stock code), which does not know these modules."""
    for name, module in model.named_modules():
        if isinstance(module, AttentionVariant):
            keys = {f"{name}.{parameter_name}" for parameter_name, _ in module.named_parameters()}
            if keys & new_keys:
                module.reset_parameters()


def _refuse_missing_variant_weights(model: nn.Module, stored: dict, missing: set[str], source: Any) -> None:
    """A checkpoint whose config says a layer already holds this variant must hold its weights: re-initialising
    them would silently load a different model. Retrofitting is for layers the checkpoint has no variant in."""
    if not missing or stored.get("attention_variant") != model.config.attention_variant:
        return
    stored_layers = stored.get("attention_variant_layers")
    names = [name for name, _ in find_attention_modules(model)]
    lost = sorted(key for key in missing for index, name in enumerate(names)
                  if key.startswith(f"{name}.attention_variant.") and (stored_layers is None or index in stored_layers))
    if lost:
        raise ValueError(
            f"The checkpoint at {source} says its attention layers {stored_layers} hold the "
            f"{model.config.attention_variant!r} variant, but it lacks that variant's weights: {_preview(lost)}. "
            "The file is incomplete or was saved by other code; re-initialising them would load a different model. "
            "To retrofit a stock checkpoint, load one without a variant (or pass another attention_variant)."
        )


# Called as hook(model, save_directory, **card_fields) after every save_pretrained. The installed package registers
# its model-card writer here (hub.py); a checkpoint's own copy of this file runs without it and writes no card.
SAVE_HOOKS: list = []

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


# Stock heads whose class name matches no Transformers loss type: Trainer then counted position 0 of every row as a
# prediction target (n tokens instead of n - 1) and reported eval losses (n - 1) / n too low.
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


def is_transformers_class(cls: type) -> bool:
    """Whether `cls` is reachable as `transformers.<name>`: what a checkpoint's code can rebuild it from."""
    return getattr(transformers, cls.__name__, None) is cls


class AttentionVariantMixin:
    """Shared by every variant model class; put it first in the bases, before the stock class."""

    stock_model_class: type[PreTrainedModel]

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if getattr(config, "use_rotary_embeddings", True) is False:
            self._drop_rotary_embeddings()
        self._apply_attention_variant()
        if self.stock_model_class.__name__ in LOSS_TYPES:
            self.loss_type = LOSS_TYPES[self.stock_model_class.__name__]

    def _apply_attention_variant(self) -> None:
        config = self.config
        if any(module is not self and isinstance(module, AttentionVariantMixin) for module in self.modules()):
            # A generic head (e.g. LlamaForSequenceClassification) builds its base model with AutoModel.from_config,
            # which gives the variant base model: its layers already hold the variant.
            return
        if config._attn_implementation in VARIANTS:
            # a variant checkpoint's config names its variant (configuration_variants writes it): the layers the
            # variant leaves untouched run SDPA, as they do in a model converted from a stock one
            config._attn_implementation = "sdpa"
        targets = apply_variant(
            self, config.attention_variant, config.attention_variant_layers, **(config.attention_variant_options or {})
        )
        self.config.attention_variant_layers = targets
        self.config._attn_implementation = config.attention_variant  # the setter reaches the sub-configs too

    def set_attn_implementation(self, attn_implementation: str | dict, *args: Any, **kwargs: Any) -> None:
        """Refuses to switch a converted model to another implementation: the config would keep saying the model
        runs its variant while it ran stock attention (and ran the variant again after a save and reload). Use
        `hf_neural_attention.revert(model)` for the stock model."""
        variant = getattr(self.config, "attention_variant", None)
        if variant is not None and attn_implementation != variant:
            raise ValueError(
                f"{type(self).__name__} runs attention variant {variant!r}; switching it to {attn_implementation!r} "
                "would leave the config and the weights describing a model that no longer runs. Use "
                "hf_neural_attention.revert(model) to get the stock model back (the variant's weights removed), "
                "then choose its implementation."
            )
        super().set_attn_implementation(attn_implementation, *args, **kwargs)

    def _drop_rotary_embeddings(self) -> None:
        replaced = 0
        for name, module in list(self.named_modules()):
            if "RotaryEmbedding" in type(module).__name__:
                parent = self.get_submodule(name.rpartition(".")[0]) if "." in name else self
                head_dim = getattr(self.config, "head_dim", None) or (
                    self.config.hidden_size // self.config.num_attention_heads
                )
                setattr(parent, name.rpartition(".")[2], NoRotaryEmbedding(head_dim))
                replaced += 1
        if replaced == 0:
            raise ValueError(f"use_rotary_embeddings=False but {type(self).__name__} has no rotary embedding module")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """Loads a variant checkpoint, or retrofits a stock one (only the variant's parameters are new).

        Weights the class does not have, or stock weights the checkpoint lacks, raise instead of being dropped or
        left random. Pass `attention_variant=`, `attention_variant_options=` and `attention_variant_layers=` to
        retrofit a stock checkpoint.
        """
        want_info = kwargs.pop("output_loading_info", False)
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        stored, _ = cls.config_class.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        if "attention_variant" in kwargs and "attention_variant_layers" not in kwargs and "config" not in kwargs:
            # The checkpoint's layer list was resolved for ITS variant (dot: every layer); a different variant starts
            # from its own paper default instead (neural: the first layer).
            if stored.get("attention_variant") != kwargs["attention_variant"]:
                kwargs["attention_variant_layers"] = None
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        unexpected = sorted(info["unexpected_keys"])
        if getattr(model, "base_model", None) is model:
            # A base model loaded from a checkpoint with a head ignores the head's weights, as Transformers does
            # (feature extraction, embeddings); a key under one of the base model's own modules still counts.
            children = dict(model.named_children())
            head = [key for key in unexpected if key.split(".", 1)[0] not in children]
            if head:
                logger.info("%s: ignoring the head weights of %s: %s", cls.__name__, pretrained_model_name_or_path,
                            _preview(head))
            unexpected = [key for key in unexpected if key not in head]
        if unexpected:
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path} does not fit {cls.__name__} (attention variant "
                f"{model.config.attention_variant!r}): it holds weights the model has no place for, which would be "
                f"dropped: {_preview(unexpected)}. Check the architecture, the variant and its options; a variant "
                "checkpoint loads only with the variant and options it was saved with."
            )
        missing = sorted(key for key in info["missing_keys"] if ".attention_variant." not in f".{key}")
        if missing:
            logger.warning(
                "%s: the checkpoint at %s lacks these stock weights, which start from a random init: %s",
                cls.__name__, pretrained_model_name_or_path, _preview(missing),
            )
        new_keys = {key for key in info["missing_keys"] if ".attention_variant." in f".{key}"}
        _refuse_missing_variant_weights(model, stored, new_keys, pretrained_model_name_or_path)
        if new_keys:  # a retrofit: the stock weights are loaded, the variant's parameters start from their init
            model.config.retrofitted_from = str(pretrained_model_name_or_path)  # the model card's base_model
            _initialize_new_variant_parameters(model, new_keys)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Stock save (safetensors, config with auto_map, this folder's code), then the SAVE_HOOKS (the installed
        package writes a model card README.md). The auto_map names the variant class of every Auto class that serves
        this architecture, so any head (or the base model) loads from the checkpoint with trust_remote_code."""
        variant_class = next(cls for cls in type(self).__mro__ if cls.__module__ == __name__)
        if variant_class is not type(self):
            # FSDP2's fully_shard gives a sharded model a subclass defined in torch (FSDPVariant...), whose module
            # custom_object_save would copy and name in auto_map; the checkpoint holds the variant class's code
            wrapper, self.__class__ = type(self), variant_class
            try:
                return self.save_pretrained(save_directory, *args, **kwargs)
            finally:
                self.__class__ = wrapper
        stock = self.stock_model_class
        if not (is_transformers_class(stock) and is_transformers_class(self.config_class.stock_config_class)):
            raise ValueError(
                f"{type(self).__name__} cannot be saved as a variant checkpoint: {stock.__module__}.{stock.__name__} "
                "is not a Transformers class, so neither this package nor the checkpoint's code could rebuild it on "
                "load. Save its state_dict with your own class, or hf_neural_attention.revert(model) first."
            )
        served = stock_classes_by_auto_class(self.config_class.stock_config_class)
        self.config.auto_map = {
            **{auto: f"{__name__.rpartition('.')[2]}.Variant{cls.__name__}" for auto, cls in served.items()},
            **{key: value for key, value in (getattr(self.config, "auto_map", None) or {}).items()
               if key == "AutoConfig"},
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        if type(self)._auto_class is None and kwargs.get("is_main_process", True):
            custom_object_save(self, save_directory)  # no Auto class serves this head: copy the code all the same
        if kwargs.get("is_main_process", True):
            for hook in SAVE_HOOKS:
                hook(self, save_directory)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "50GB", **card_fields: Any) -> str:
        """Uploads weights, code and model card as one commit through huggingface_hub's public API (the stock version
        would replace the card by a generic one). Extra keyword arguments (datasets, metrics, ...) go to the card."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            if card_fields:
                for hook in SAVE_HOOKS:
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
        # save_pretrained copies this code and writes auto_map["<Auto class>"]; None where no Auto class serves it
        serving = [auto for auto, cls in stock_classes_by_auto_class(stock.config_class).items() if cls is stock]
        serving.sort(key=lambda auto: (auto == "AutoModelForPreTraining", auto != "AutoModel"))  # the card names it
        if serving:
            model_class.register_for_auto_class(serving[0])
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
