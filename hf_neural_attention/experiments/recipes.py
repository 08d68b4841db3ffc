"""Recipes: the model and data fields of a training run (`ModelArguments`, `DataArguments`; TrainingArguments holds
the rest) and their validation, types first (a YAML yes/no never becomes a truthy string), then ranges."""

from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from . import data as data_lib
from .. import VARIANTS, parse_layer_spec, validate_variant_options

ARCHITECTURES = ("gpt2", "llama", "vit")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "hf_neural_attention")


@dataclass
class ModelArguments:
    architecture: str = field(default="gpt2", metadata={"help": f"one of {ARCHITECTURES}"})
    attention_variant: str = field(default="dot", metadata={"help": f"one of {VARIANTS}"})
    attention_options: dict | None = field(default=None, metadata={"help": "the variant's options (a mapping)"})
    attention_layers: str | None = field(
        default=None, metadata={"help": 'None (paper default), "all", or comma-separated attention-layer indices'})
    hidden_size: int = field(default=256, metadata={"help": "width of the residual stream (a multiple of num_heads)"})
    num_layers: int = field(default=4, metadata={"help": "transformer blocks"})
    num_heads: int = field(
        default=4, metadata={"help": "attention heads per layer (head size hidden_size / num_heads)"})
    num_kv_heads: int | None = field(default=None, metadata={"help": "llama: key/value heads (GQA)"})
    intermediate_size: int | None = field(default=None, metadata={"help": "default: 4 * hidden_size"})
    max_position_embeddings: int = field(
        default=1024, metadata={"help": "gpt2, llama: the longest sequence the position embeddings cover"})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout probability in [0, 1) (gpt2: residual, embedding, attention; llama: attention; vit: hidden, "
                "attention)"})
    use_rotary_embeddings: bool = field(default=True, metadata={"help": "llama: False gives NoPE"})
    image_size: int | None = field(default=None, metadata={"help": "vit: default is the data set's image size"})
    patch_size: int = field(default=2, metadata={"help": "vit: side of the square image patches, in pixels"})
    init_from: str | None = field(
        default=None, metadata={"help": "a stock checkpoint to retrofit instead of training from scratch"})


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None,
        metadata={"help": f"text: {data_lib.TEXT_DATASETS}; images: {data_lib.IMAGE_DATASETS}; "
                          "default stdlib-prose (gpt2, llama) or digits (vit)"})
    data_files: str | None = field(default=None, metadata={"help": "dataset 'text': file path or glob"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset 'imagefolder': folder"})
    block_size: int = field(default=128, metadata={"help": "text: tokens per training sequence (documents are packed)"})
    vocab_size: int = field(
        default=4096, metadata={"help": "text: vocabulary of the byte-level BPE trained on the training split"})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "a tokenizer to load instead of training a byte-level BPE"})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "use at most this many training sequences/images (default: all)"})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "use at most this many validation and test sequences/images (default: all)"})
    eval_stride: int | None = field(
        default=None, metadata={"help": "tokens scored per window of the final sliding-window perplexity "
                                         "(default block_size // 2; at most block_size - 1)"})
    cache_dir: str = field(
        default=DEFAULT_CACHE, metadata={"help": "where data sets and trained tokenizers are cached"})


def _simple_types(annotation: Any) -> tuple[set[type], bool] | None:
    """({bool, int, float, str, dict}-subset, None allowed) of a field annotation, or None for anything richer
    (enums, lists, unions with other types), which HfArgumentParser and TrainingArguments check themselves."""
    allowed, optional = set(), False
    for member in typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
            else (annotation,):
        if member is type(None):
            optional = True
        elif member in (bool, int, float, str, dict):
            allowed.add(member)
        else:
            return None
    return allowed, optional


def check_recipe_types(recipe: dict) -> None:
    """Every recipe value of a boolean, integer, float, string or mapping field must have that type: YAML's yes/no
    and quoted numbers stay strings in a recipe, and a string is never silently read as a boolean."""
    hints = {}
    for cls in (ModelArguments, DataArguments, TrainingArguments):
        hints.update(typing.get_type_hints(cls))
    for key, value in recipe.items():
        kinds = _simple_types(hints[key]) if key in hints else None
        if kinds is None:
            continue
        allowed, optional = kinds
        if key == "fsdp":  # TrainingArguments' `fsdp: str | None` takes true (FSDP on) besides the legacy strings
            allowed = allowed | {bool}
        if value is None and optional:
            continue
        ok = (
            (bool in allowed and isinstance(value, bool))
            or (int in allowed and isinstance(value, int) and not isinstance(value, bool))
            or (float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (str in allowed and isinstance(value, str))
            or (dict in allowed and isinstance(value, dict))
        )
        if not ok:
            names = sorted(t.__name__ for t in allowed) + (["null"] if optional else [])
            hint = " (write true or false)" if allowed == {bool} else ""
            raise ValueError(f"recipe field {key!r} must be {' or '.join(names)}{hint}; got {value!r}")


# (field, smallest valid value) of the integer fields; None values keep their defaults.
_AT_LEAST = {"hidden_size": 1, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "intermediate_size": 1,
             "max_position_embeddings": 2, "image_size": 1, "patch_size": 1, "block_size": 2, "vocab_size": 260,
             "max_train_samples": 1, "max_eval_samples": 1, "eval_stride": 1}


def validate_arguments(model_args: ModelArguments, data_args: DataArguments) -> None:
    """Clear errors for recipe values that would otherwise fail deep inside training."""
    if model_args.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={model_args.architecture!r} is not valid; choose one of {list(ARCHITECTURES)}")
    if model_args.attention_variant not in VARIANTS:
        raise ValueError(f"attention_variant={model_args.attention_variant!r} is not valid; choose one of "
                         f"{list(VARIANTS)}")
    try:
        validate_variant_options(model_args.attention_variant, model_args.attention_options)
        parse_layer_spec(model_args.attention_layers)
    except ValueError as error:
        raise ValueError(f"attention_options/attention_layers: {error}") from None
    for args in (model_args, data_args):
        for name, value in vars(args).items():
            if name in _AT_LEAST and value is not None and value < _AT_LEAST[name]:
                raise ValueError(f"{name} must be an integer >= {_AT_LEAST[name]}; got {value}")
    if not 0.0 <= model_args.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {model_args.dropout}")
    if model_args.hidden_size % model_args.num_heads:
        raise ValueError(f"hidden_size ({model_args.hidden_size}) must be a multiple of num_heads "
                         f"({model_args.num_heads})")
    if model_args.num_kv_heads is not None and model_args.num_heads % model_args.num_kv_heads:
        raise ValueError(f"num_heads ({model_args.num_heads}) must be a multiple of num_kv_heads "
                         f"({model_args.num_kv_heads})")
    if data_args.eval_stride is not None and data_args.eval_stride >= data_args.block_size:
        raise ValueError(f"eval_stride must be in [1, block_size - 1] = [1, {data_args.block_size - 1}]; "
                         f"got {data_args.eval_stride}")
    dataset = dataset_name(model_args, data_args)
    valid = data_lib.IMAGE_DATASETS if model_args.architecture == "vit" else data_lib.TEXT_DATASETS
    if dataset not in valid:
        raise ValueError(f"dataset={dataset!r} does not fit architecture {model_args.architecture!r}; choose one of "
                         f"{list(valid)}")
    if model_args.init_from is not None and not (Path(model_args.init_from).exists() or "/" in model_args.init_from):
        raise FileNotFoundError(f"init_from={model_args.init_from!r} is neither a folder nor a Hub id")


def dataset_name(model_args: ModelArguments, data_args: DataArguments) -> str:
    if data_args.dataset is not None:
        return data_args.dataset
    return "digits" if model_args.architecture == "vit" else "stdlib-prose"
