"""Retrofit an existing Transformers checkpoint (any architecture and head that `convert` accepts) with an attention variant and save it as a variant checkpoint.

    hfna-retrofit CHECKPOINT VARIANT OUTPUT_DIR [--layers all|0,3,5] [--option KEY=VALUE ...]
                               [--push-to-hub REPO_ID] [--private]

CHECKPOINT is a local folder or a Hub id. Every existing weight is kept; only the variant's parameters are new.
The output folder holds safetensors weights, the config with `auto_map`, the modeling code and a model card, so it
loads with `from_pretrained(OUTPUT_DIR, trust_remote_code=True)` without this package. `--push-to-hub` uploads that
folder through the model's own `push_to_hub`. A tokenizer or image processor found next to the checkpoint is copied; when the checkpoint has none, none is
saved (and the command says so) rather than an empty tokenizer built from the model type.

Examples:
    python scripts/retrofit.py openai-community/gpt2 cdape gpt2-cdape --option kernel_size=3
    python scripts/retrofit.py ./my-llama neural ./my-llama-neural --layers all --option combine=add
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

import hf_neural_attention as hfna


def parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)  # numbers, true/false, lists
    except json.JSONDecodeError:
        value = raw  # plain strings such as alibi or add
    return key.strip(), value


def parse_layers(text: str | None) -> None | str | list[int]:
    try:
        return hfna.parse_layer_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--layers: {error}") from None


def model_class_for(checkpoint: str):
    """The class the checkpoint was saved from (config.architectures), so its head is kept; else AutoModel."""
    architectures = getattr(AutoConfig.from_pretrained(checkpoint), "architectures", None) or []
    for architecture in architectures:
        model_class = getattr(transformers, architecture, None)
        if model_class is not None:
            return model_class
    return AutoModel


# Files one of which every saved tokenizer has (Transformers' tokenizer config, a fast tokenizer's tokenizer.json, or
# the vocabulary files of the slow BPE, WordPiece and SentencePiece tokenizers).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer_files(checkpoint: str) -> bool:
    """Whether the checkpoint (a folder, or a Hub id reached or cached) holds any tokenizer file. Without one,
    AutoTokenizer still builds a tokenizer from the model type, with an empty vocabulary (a 1-token GPT2Tokenizer
    for GPT-2), and saving that would ship a tokenizer that encodes every text to nothing."""
    from transformers.utils import cached_file

    for name in TOKENIZER_FILES:
        try:
            if cached_file(checkpoint, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) is not None:
                return True
        except (OSError, ValueError):
            continue
    return False


def copy_preprocessor(checkpoint: str, output_dir: str) -> str | None:
    """Copy the tokenizer (if the checkpoint has tokenizer files) or else an image processor; the class name of what
    was copied, or None when there was none."""
    loaders = ((AutoTokenizer,) if has_tokenizer_files(checkpoint) else ()) + (AutoImageProcessor,)
    for loader in loaders:
        try:
            preprocessor = loader.from_pretrained(checkpoint)
        except (OSError, ValueError, KeyError):
            continue  # none of this kind next to the checkpoint
        except ImportError as error:  # e.g. an image processor without Pillow installed
            print(f"warning: could not copy the {loader.__name__[4:]}: {error}".strip(), file=sys.stderr)
            continue
        if loader is AutoTokenizer and len(preprocessor) <= 1:  # files present but no vocabulary: do not ship it
            print(f"warning: the tokenizer next to {checkpoint} has {len(preprocessor)} token(s); not copied",
                  file=sys.stderr)
            continue
        preprocessor.save_pretrained(output_dir)
        return type(preprocessor).__name__
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="stock checkpoint: local folder or Hub id")
    parser.add_argument("variant", choices=hfna.VARIANTS)
    parser.add_argument("output_dir")
    parser.add_argument("--layers", type=parse_layers, default=None,
                        help='"all" or comma-separated attention-layer indices (default: the paper default)')
    parser.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a variant option, repeatable (values parsed as JSON when possible)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None)
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(args.option)
    model = model_class_for(args.checkpoint).from_pretrained(args.checkpoint)
    try:
        model = hfna.convert(model, args.variant, layers=args.layers, **options)  # records retrofitted_from
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.save_pretrained(args.output_dir)
    preprocessor = copy_preprocessor(args.checkpoint, args.output_dir)
    print(f"saved {type(model).__name__} ({args.variant}, layers {model.config.attention_variant_layers}, "
          f"options {model.config.attention_variant_options}) to {args.output_dir}"
          + (f" with its {preprocessor}" if preprocessor else
             f"; no tokenizer or image processor saved ({args.checkpoint} has none): save yours next to it with "
             f"tokenizer.save_pretrained({args.output_dir!r}) before generating text or using pipeline()"))
    if args.push_to_hub:
        url = model.push_to_hub(args.push_to_hub, private=args.private)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
