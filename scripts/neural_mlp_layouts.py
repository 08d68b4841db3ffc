"""Why NeuralAttention.mlp keeps the hidden units leading: three ways to run the pairwise MLP on CPU, timed.

    units_leading   [B, H, units, Lq * Lk]: one matmul [G, out, in] @ [B, H, in, pairs] per layer (the package's)
    units_last      [B, H, Lq, Lk, units]: one einsum per layer, a matmul with the tiny unit count inside
    planes          one [B, H, Lq, Lk] plane per unit: one elementwise multiply-add per weight (the package's until
                    2026-11-30, for the paper's narrow layers)

The two alternatives are re-stated here (the package no longer has them); all three take the first layer's parts as
NeuralAttention.first_layer_parts gives them and return the same scores (checked). Shapes: a decoding step (one
query row over a 1k / 4k cache, batch 1 and 8) timed forward without gradients, and the chunks the chunked engine
runs in training at n = 2048 (64 and 256 query rows), forward + backward. GPT-2 geometry (8 heads, d_h 64), the
paper's widths (d' = 2, MLP 4 -> 2 -> 1 -> 1) and a wide MLP (d' = 8, hidden [32, 16]). Best of the repeats, one
thread, float32.

    python scripts/neural_mlp_layouts.py        # about 2 minutes
Writes results/neural_mlp_layouts.md.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from hf_neural_attention import NeuralAttention

SHAPES = [  # (what, batch, query rows, keys, with backward)
    ("decoding step, 1k cache", 1, 1, 1024, False), ("decoding step, 1k cache, batch 8", 8, 1, 1024, False),
    ("decoding step, 4k cache", 1, 1, 4096, False), ("training chunk, 64 x 2048", 1, 64, 2048, True),
    ("training chunk, 256 x 2048", 1, 256, 2048, True),
]
WIDTHS = {"paper (d' 2, hidden [2, 1])": {}, "wide (d' 8, hidden [32, 16])": {"proj_dim": 8, "hidden_dims": [32, 16]}}


def units_last(scorer: NeuralAttention, query_part, key_part, weights, biases):
    hidden = torch.relu(query_part[:, :, :, None, :] + key_part[:, :, None, :, :])  # [B, H, Lq, Lk, h1]
    for index, (weight, bias) in enumerate(zip(weights, biases)):
        weight, bias = weight.expand(hidden.shape[1], -1, -1), bias.expand(hidden.shape[1], -1)
        hidden = torch.einsum("bhqkc,hoc->bhqko", hidden, weight) + bias[None, :, None, None, :]
        if index != len(weights) - 1:
            hidden = torch.relu(hidden)
    return hidden.squeeze(-1)


def planes(scorer: NeuralAttention, query_part, key_part, weights, biases):
    units = [torch.relu(query_part[..., unit, None] + key_part[..., None, :, unit])
             for unit in range(query_part.shape[-1])]
    for index, (weight, bias) in enumerate(zip(weights, biases)):
        outputs = []
        for out in range(weight.shape[1]):
            hidden = bias[:, out, None, None]
            for unit, plane in enumerate(units):
                hidden = torch.addcmul(hidden, plane, weight[:, out, unit, None, None])
            outputs.append(torch.relu(hidden) if index != len(weights) - 1 else hidden)
        units = outputs
    return units[0]


LAYOUTS = {"units_leading": lambda scorer, *parts: scorer.mlp(*parts), "units_last": units_last, "planes": planes}


def best_time(step, repeats: int) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def measure(scorer: NeuralAttention, batch: int, rows: int, keys: int, backward: bool) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, 8, rows, 64, generator=generator)
    key = torch.randn(batch, 8, keys, 64, generator=generator)
    weights, biases = list(scorer.mlp_weights)[1:], list(scorer.mlp_biases)[1:]
    with torch.no_grad():
        query_part, key_part = scorer.first_layer_parts(query, key)
        reference = scorer.mlp(query_part, key_part, weights, biases)
        for layout in LAYOUTS.values():  # the same scores from every layout
            torch.testing.assert_close(layout(scorer, query_part, key_part, weights, biases), reference)
    parts = [query_part.requires_grad_(backward), key_part.requires_grad_(backward)]
    grad = torch.randn(reference.shape, generator=generator)
    times = {}
    for name, layout in LAYOUTS.items():
        def step():
            with torch.set_grad_enabled(backward):
                scores = layout(scorer, *parts, weights, biases)
                if backward:
                    torch.autograd.grad(scores, [*parts, *weights, *biases], grad)
        times[name] = best_time(step, repeats=3 if backward else 20)
    return times


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = ["# Neural attention's MLP: three layouts timed on CPU", "",
             f"`python scripts/neural_mlp_layouts.py` on {time.strftime('%Y-%m-%d')} ({platform.processor() or 'CPU'}"
             f", torch {torch.__version__}, one thread). Milliseconds, best of the repeats; what each layout is: the "
             "script's docstring. Forward only for decoding steps, forward + backward for training chunks.", "",
             "| MLP | shape | units leading (ms) | units last (ms) | planes (ms) |", "|---|---|---:|---:|---:|"]
    for width, options in WIDTHS.items():
        scorer = NeuralAttention(8, 64, **options)
        for what, batch, rows, keys, backward in SHAPES:
            times = measure(scorer, batch, rows, keys, backward)
            lines.append(f"| {width} | {what} | " + " | ".join(f"{1e3 * times[name]:.2f}" for name in LAYOUTS) + " |")
            print(lines[-1], flush=True)
    out = Path("results/neural_mlp_layouts.md")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
