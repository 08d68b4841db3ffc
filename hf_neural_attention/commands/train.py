"""Train one model with the stock Trainer from a YAML/JSON recipe, with command-line overrides.

    hfna-train configs/gpt2_stdlib.yaml [--attention_variant cdape] [--max_steps 100] ...   (or scripts/train.py)
    torchrun --nproc_per_node 2 -m hf_neural_attention.commands.train configs/gpt2_stdlib.yaml --use_cpu true
    torchrun --nproc_per_node 2 -m hf_neural_attention.commands.train configs/gpt2_stdlib.yaml --use_cpu true \\
        --fsdp true --fsdp_config '{transformer_layer_cls_to_wrap: [GPT2Block]}'      # FSDP (README "Several machines")

A recipe holds the fields of ModelArguments, DataArguments (hf_neural_attention/experiments/recipes.py) and
transformers.TrainingArguments in one mapping. Overrides are `--key value` or `--key=value`; values are read as
YAML (numbers, true/false, mappings such as --attention_options '{kernel_size: 5}'). Unknown keys are errors.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import yaml
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import HfArgumentParser, TrainingArguments

from hf_neural_attention.experiments.recipes import DataArguments, ModelArguments, check_recipe_types
from hf_neural_attention.experiments.training import run


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `eval_strategy: no` stays the string "no"."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)


def read_recipe(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"recipe {path!r} does not exist")
    text = file.read_text()
    recipe = json.loads(text) if file.suffix == ".json" else load_yaml(text)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path!r} must be a mapping of argument names to values")
    return recipe


def parse_overrides(arguments: list[str]) -> dict:
    overrides, index = {}, 0
    while index < len(arguments):
        item = arguments[index]
        if not item.startswith("--"):
            raise ValueError(f"expected --key value, got {item!r}")
        if "=" in item:
            key, raw = item[2:].split("=", 1)
            index += 1
        else:
            if index + 1 >= len(arguments):
                raise ValueError(f"{item} needs a value")
            key, raw = item[2:], arguments[index + 1]
            index += 2
        overrides[key] = load_yaml(raw)
    return overrides


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    recipe = {}
    if argv and not argv[0].startswith("--"):
        recipe = read_recipe(argv[0])
        argv = argv[1:]
    recipe.update(parse_overrides(argv))
    return parse_dict_recipe(recipe)


def parse_dict_recipe(recipe: dict) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    recipe = {"output_dir": "outputs/run", **recipe}
    check_recipe_types(recipe)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    try:
        return parser.parse_dict(recipe, allow_extra_keys=False)
    except ValueError as error:
        if "not used by the HfArgumentParser" in str(error):
            raise ValueError(f"unknown recipe key(s): {str(error).split(':', 1)[1].strip()}") from None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        model_args, data_args, training_args = parse(argv)
        results = run(model_args, data_args, training_args, launch_arguments=argv)
    except (ValueError, FileNotFoundError, StrictDataclassClassValidationError) as error:
        # Config validation wraps our ValueError; show the message that names the problem.
        cause = error.__cause__ if isinstance(error, StrictDataclassClassValidationError) else error
        print(f"error: {cause}", file=sys.stderr)
        return 2
    finish_distributed()
    if training_args.process_index == 0:
        headline = {k: v for k, v in results.items() if k.startswith(("validation_", "test_"))}
        print(json.dumps({"output_dir": training_args.output_dir, **headline}, indent=2))
    return 0


def help_text() -> str:
    """Every recipe field with its help text and default: the model and data fields first, each set under its own
    heading, then the ~100 fields of transformers.TrainingArguments."""
    titled = [type(cls.__name__, (cls,), {"_argument_group_name": title}) for cls, title in (
        (ModelArguments, "model fields (ModelArguments, hf_neural_attention/experiments/recipes.py)"),
        (DataArguments, "data fields (DataArguments, hf_neural_attention/experiments/recipes.py)"),
        (TrainingArguments, "training fields (transformers.TrainingArguments)"))]
    parser = HfArgumentParser(titled)
    parser.usage = "hfna-train [RECIPE.yaml] [--key value ...]"
    return __doc__.strip() + "\n\n" + parser.format_help()


def finish_distributed() -> None:
    """In a multi-process run, every rank waits until rank 0 has written its outputs, then the process group is shut
    down before the interpreter exits. Without it a rank could exit while rank 0 still wrote, and the teardown of the
    open group aborted ("terminate called without an active exception", mpirun exit 15) in about 1 run in 4."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
