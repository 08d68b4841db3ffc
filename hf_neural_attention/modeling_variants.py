"""GPT-2, Llama and ViT model classes that apply an attention variant from their config, and `convert`.

Each class subclasses the stock one and adds only `AttentionVariantMixin`, which (1) injects the variant's
parameters after the stock `__init__`, (2) initialises exactly those parameters when a stock checkpoint is loaded,
(3) refuses checkpoints that do not fit, and (4) writes a model card next to every save. `register_for_auto_class`
makes `save_pretrained` copy this flat folder's code into the checkpoint and write `auto_map`, so it loads with
`trust_remote_code=True` where this package is not installed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import (
    GPT2LMHeadModel,
    GPT2Model,
    LlamaForCausalLM,
    LlamaModel,
    ViTForImageClassification,
    ViTModel,
)

from .configuration_variants import VariantGPT2Config, VariantLlamaConfig, VariantViTConfig
from .attention_interface import register_variants  # noqa: F401 (importing it registers the variants)
from .injection import apply_variant, find_attention_modules
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
    PreTrainedModel's `_init_weights` (stock GPT-2/Llama/ViT code), which does not know these modules."""
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


class AttentionVariantMixin:
    """Shared by every variant model class; put it first in the bases, before the stock class."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if getattr(config, "use_rotary_embeddings", True) is False:
            self._drop_rotary_embeddings()
        self._apply_attention_variant()

    def _apply_attention_variant(self) -> None:
        config = self.config
        targets = apply_variant(
            self, config.attention_variant, config.attention_variant_layers, **(config.attention_variant_options or {})
        )
        self.config.attention_variant_layers = targets
        self.config._attn_implementation_internal = config.attention_variant

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
        package writes a model card README.md)."""
        super().save_pretrained(save_directory, *args, **kwargs)
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


class VariantGPT2Model(AttentionVariantMixin, GPT2Model):
    config_class = VariantGPT2Config


class VariantGPT2LMHeadModel(AttentionVariantMixin, GPT2LMHeadModel):
    config_class = VariantGPT2Config

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        # The stock class name matches no loss type, so Trainer counted position 0 of every row as a prediction
        # target (n tokens instead of n - 1) and reported eval losses (n - 1) / n too low; this is its causal-LM loss.
        self.loss_type = "ForCausalLM"


class VariantLlamaModel(AttentionVariantMixin, LlamaModel):
    config_class = VariantLlamaConfig


class VariantLlamaForCausalLM(AttentionVariantMixin, LlamaForCausalLM):
    config_class = VariantLlamaConfig


class VariantViTModel(AttentionVariantMixin, ViTModel):
    config_class = VariantViTConfig


class VariantViTForImageClassification(AttentionVariantMixin, ViTForImageClassification):
    config_class = VariantViTConfig


# (stock class, variant class, Auto class name it registers for)
VARIANT_MODEL_CLASSES = (
    (GPT2Model, VariantGPT2Model, "AutoModel"),
    (GPT2LMHeadModel, VariantGPT2LMHeadModel, "AutoModelForCausalLM"),
    (LlamaModel, VariantLlamaModel, "AutoModel"),
    (LlamaForCausalLM, VariantLlamaForCausalLM, "AutoModelForCausalLM"),
    (ViTModel, VariantViTModel, "AutoModel"),
    (ViTForImageClassification, VariantViTForImageClassification, "AutoModelForImageClassification"),
)
STOCK_TO_VARIANT = {stock: variant for stock, variant, _ in VARIANT_MODEL_CLASSES}

for _config_class in (VariantGPT2Config, VariantLlamaConfig, VariantViTConfig):
    _config_class.register_for_auto_class("AutoConfig")
for _, _variant_class, _auto_class in VARIANT_MODEL_CLASSES:
    _variant_class.register_for_auto_class(_auto_class)
