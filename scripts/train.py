"""Train one model with the stock Trainer from a YAML/JSON recipe: `python scripts/train.py RECIPE.yaml [--key value]`
(the same as the `hfna-train` console script; `--help` lists every field). The code lives in
hf_neural_attention/commands/train.py."""

import sys

from hf_neural_attention.commands.train import main, parse, parse_dict_recipe, read_recipe  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
