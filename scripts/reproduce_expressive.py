"""Expressive attention vs dot-product attention on a ladder of synthetic autoregressive tasks.

Claim (Gros, arXiv 2407.18601): expressive attention (EA) matches dot-product attention (DPA) on easy tasks and
beats it by a growing margin as task complexity rises, reaching 100% where DPA cannot.

The task family ("delayed recurrence"): every sequence starts with `delay` random symbols from an alphabet of
`alphabet` symbols, and continues deterministically with

    x_t = (x_{t - delay} + x_{t - delay + 1}) mod alphabet        (a lagged-Fibonacci recurrence)

so predicting x_t needs two tokens found exactly `delay` and `delay - 1` positions back, and their sum modulo the
alphabet size. One knob sets the complexity: level L uses alphabet = 2 + 2L and delay = 2 + L (both the number of
symbol pairs to tell apart and the distance to reach grow). Accuracy is measured on the deterministic positions
of held-out sequences (100% is reachable by an exact solution; chance is 1/alphabet).

Each arm is the same small GPT-2 trained from scratch with the stock Trainer on the same sequences, steps,
optimizer and seed; the only difference is the attention variant. At least 3 seeds per arm and level.

    python scripts/reproduce_expressive.py                      # default: CPU budget of about 30 minutes
    python scripts/reproduce_expressive.py --levels 1 2 3 4 5 6 --seeds 0 1 2 3 4 --steps 4000   # a GPU
Writes results/reproduce_expressive/{results.json, results.md, accuracy.png, cards/*.md}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from hf_neural_attention import VariantGPT2Config, VariantGPT2LMHeadModel
from hf_neural_attention.hub import build_model_card
from hf_neural_attention.experiments.harness import (
    arms_by_seeds, describe_schedule, markdown_table, mean_sd, parse_reproduction_args, pyplot, reproduction_parser,
    save_figure, schedule, spread, train_built_arm, values_of, write_results)

REPO = Path(__file__).resolve().parents[1]
ARMS = {"dot": ("dot", {}), "expressive": ("expressive", {"form": "rational", "scale": True})}
# The first runs used AdamW's defaults here (beta2 0.999) and no weight decay; kept so results stay comparable.
OPTIMIZER = {"weight_decay": 0.0, "adam_beta2": 0.999}


def level_settings(level: int) -> tuple[int, int]:
    """(alphabet size, delay) for a complexity level."""
    return 2 + 2 * level, 2 + level


def make_sequences(level: int, count: int, length: int, seed: int) -> np.ndarray:
    alphabet, delay = level_settings(level)
    rng = np.random.default_rng(seed)
    sequences = np.zeros((count, length), dtype=np.int64)
    sequences[:, :delay] = rng.integers(0, alphabet, size=(count, delay))
    for t in range(delay, length):
        sequences[:, t] = (sequences[:, t - delay] + sequences[:, t - delay + 1]) % alphabet
    return sequences


def build_dataset(sequences: np.ndarray, level: int) -> Dataset:
    _, delay = level_settings(level)
    labels = sequences.copy()
    labels[:, :delay] = -100  # the random prefix is not predictable; train and score only the recurrence
    return Dataset.from_dict({"input_ids": sequences.tolist(), "labels": labels.tolist()}).with_format("torch")


@torch.no_grad()
def accuracy(model, dataset: Dataset) -> float:
    model.eval()
    batch = dataset[:]  # the whole held-out set as tensors
    device = next(model.parameters()).device  # where the Trainer left the model
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    predictions = model(input_ids=ids).logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    scored = targets != -100
    return float((predictions[scored] == targets[scored]).float().mean())


def build_model(arm: str, level: int, args) -> VariantGPT2LMHeadModel:
    variant, options = ARMS[arm]
    config = VariantGPT2Config(
        vocab_size=level_settings(level)[0], n_positions=args.length, n_embd=args.hidden_size, n_layer=args.layers,
        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attention_variant=variant, attention_variant_options=options, attention_variant_layers="all")
    return VariantGPT2LMHeadModel(config)


def train_arm(arm: str, level: int, seed: int, args, output: Path) -> dict:
    alphabet, delay = level_settings(level)
    train = build_dataset(make_sequences(level, args.train_sequences, args.length, seed=10_000 + level), level)
    test = build_dataset(make_sequences(level, args.test_sequences, args.length, seed=20_000 + level), level)
    model, seconds = train_built_arm(lambda: build_model(arm, level, args), train,
                                     Path(args.runs_dir) / f"{arm}-L{level}-s{seed}", seed,
                                     **schedule(args.steps, args.batch_size, args.learning_rate, **OPTIMIZER))
    row = {"arm": arm, "level": level, "alphabet": alphabet, "delay": delay, "seed": seed,
           "accuracy": accuracy(model, test), "parameters": sum(p.numel() for p in model.parameters()),
           "seconds": seconds}
    if seed == args.seeds[0]:  # one model card per arm and level, for its first seed
        build_model_card(
            model, metrics=["accuracy"],
            results=markdown_table(["level", "alphabet", "delay", "test accuracy"],
                                   [(level, alphabet, delay, f"{row['accuracy']:.4f}")], "rrrr"),
            training_data=f"the delayed-recurrence task of scripts/reproduce_expressive.py at level {level}, "
                          f"{args.steps} steps of batch {args.batch_size}, seed {seed}",
        ).save(output / "cards" / f"{arm}-L{level}.md")
    return row


def summarize(rows: list[dict], levels: list[int]) -> tuple[str, list[dict]]:
    summary, cells = [], []
    for level in levels:
        entry = {"level": level, "alphabet": level_settings(level)[0], "delay": level_settings(level)[1]}
        for arm in ARMS:
            values = values_of(rows, "accuracy", arm=arm, level=level)
            entry[arm] = (*mean_sd(values), values)
        entry["gap"] = entry["expressive"][0] - entry["dot"][0]
        summary.append(entry)
        cells.append([level, entry["alphabet"], entry["delay"], f"{1 / entry['alphabet']:.3f}",
                      spread(entry["dot"][2], 3), spread(entry["expressive"][2], 3), f"{entry['gap']:+.3f}",
                      len(entry["dot"][2])])
    header = ["level", "alphabet", "delay", "chance", "dot (mean ± sd)", "expressive (mean ± sd)", "expressive − dot",
              "seeds"]
    return markdown_table(header, cells, "r" * len(header)), summary


def plot(summary: list[dict], path: Path) -> None:
    figure, axis = pyplot().subplots(figsize=(6, 4))
    levels = [entry["level"] for entry in summary]
    for arm, color in (("dot", "C0"), ("expressive", "C1")):
        means = [entry[arm][0] for entry in summary]
        sds = [entry[arm][1] for entry in summary]
        axis.errorbar(levels, means, yerr=sds, color=color, marker="o", capsize=3, label=arm)
        for entry in summary:
            axis.scatter([entry["level"]] * len(entry[arm][2]), entry[arm][2], color=color, alpha=0.3, s=10)
    axis.plot(levels, [1 / entry["alphabet"] for entry in summary], color="grey", linestyle=":", label="chance")
    axis.set_xlabel("complexity level (alphabet 2+2L, delay 2+L)")
    axis.set_ylabel("test accuracy on the recurrence")
    axis.set_ylim(0, 1.02)
    save_figure(figure, path, fontsize=None)


def main(argv: list[str] | None = None) -> int:
    parser = reproduction_parser(__doc__, "reproduce_expressive", REPO)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--train-sequences", type=int, default=4096)
    parser.add_argument("--test-sequences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    args = parse_reproduction_args(parser, argv)

    output = Path(args.output)
    (output / "cards").mkdir(parents=True, exist_ok=True)
    rows = []
    for level in args.levels:
        rows += arms_by_seeds(ARMS, args.seeds, lambda arm, seed: train_arm(arm, level, seed, args, output),
                              lambda row: f"level {row['level']} seed {row['seed']} {row['arm']:<10} accuracy "
                                          f"{row['accuracy']:.3f} ({row['seconds']:.0f}s)")
    table, summary = summarize(rows, args.levels)
    setting = (f"GPT-2, {args.layers} layers, d_model {args.hidden_size}, {args.heads} heads, "
               f"{rows[0]['parameters']:,} parameters in both arms; {args.steps} steps of batch {args.batch_size}, "
               f"sequences of {args.length} tokens, {describe_schedule(args.learning_rate, **OPTIMIZER)}; "
               f"seeds {args.seeds}; expressive = {ARMS['expressive'][1]} in every layer")
    write_results(output, f"{setting}\n\n{table}", setting=vars(args), runs=rows)
    plot(summary, output / "accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
