"""Side-by-side forward pass of every attention variant on the same tiny GPT-2 (random weights, offline).

Prints one row per variant: added parameters, forward time, and how far its logits move from the dot-product
control. The training comparison (the main job) replaces this once scripts/train.py exists.
"""

from __future__ import annotations

import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_neural_attention as hfna


def main() -> None:
    def fresh_config() -> GPT2Config:  # convert() records the variant on the config, so one config per model
        return GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=512, vocab_size=1000, bos_token_id=0,
                          eos_token_id=0)

    config = fresh_config()
    ids = torch.randint(0, config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    rows = []
    reference = None
    for variant in hfna.VARIANTS:
        torch.manual_seed(0)
        model = hfna.convert(GPT2LMHeadModel(fresh_config()).eval(), variant, layers="all")
        added = sum(p.numel() for n, p in model.named_parameters() if ".attention_variant." in n)
        with torch.no_grad():
            model(ids)  # warm-up
            start = time.perf_counter()
            logits = model(ids).logits
            seconds = time.perf_counter() - start
        reference = logits if reference is None else reference
        rows.append((variant, added, seconds * 1000, (logits - reference).abs().max().item()))

    print(f"tiny GPT-2: {config.n_layer} layers, d_model {config.n_embd}, {config.n_head} heads, batch 2 x 256 tokens")
    print(f"{'variant':<11} {'added params':>12} {'forward ms':>11} {'max |logit - dot|':>18}")
    for variant, added, ms, diff in rows:
        print(f"{variant:<11} {added:>12,} {ms:>11.1f} {diff:>18.3e}")


if __name__ == "__main__":
    main()
