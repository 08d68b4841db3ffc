"""Retrofit a GPT-2, Llama or ViT checkpoint with an attention variant: `python scripts/retrofit.py CHECKPOINT VARIANT
OUTPUT_DIR [--layers ...] [--option KEY=VALUE ...]` (the same as the `hfna-retrofit` console script). The code lives
in hf_neural_attention/commands/retrofit.py."""

import sys

from hf_neural_attention.commands.retrofit import main

if __name__ == "__main__":
    sys.exit(main())
