"""Retrofit: is converting a trained dot-product model and fine-tuning briefly as good as training the variant from
scratch for the same total number of steps?

Protocol per seed (stock Trainer, same data, batch, optimizer and schedule shape everywhere):
    pretrain          a GPT-2 with dot-product attention, P steps
    dot-scratch       dot-product attention from scratch for P + F steps (what the total budget gives the baseline)
    <v>-converted     the pretrained model converted to variant v, before any fine-tuning (its new parameters are
                      initialised as on a fresh model; cdape's zero-initialised convolution preserves the function)
    <v>-retrofit      the converted model fine-tuned for F steps
    <v>-scratch       variant v from scratch for P + F steps
for v in expressive, neural (first layer, the paper's placement), cdape. Reported: test perplexity (mean ± sd over
seeds) and the per-seed paired difference retrofit - scratch (negative = retrofit better).

    python scripts/reproduce_retrofit.py                     # default CPU budget (about 25 minutes)
    python scripts/reproduce_retrofit.py --pretrain-steps 20000 --finetune-steps 2000 --hidden-size 512 --layers 8 \
        --heads 8 --dataset wikitext-103                       # a GPU
Writes results/reproduce_retrofit/{results.json, results.md, results.png, cards/*.md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from hf_neural_attention import VariantGPT2LMHeadModel
from hf_neural_attention.experiments.harness import (
    copy_model_card, describe_schedule, markdown_table, mean_sd, paired_reading, parse_reproduction_args, pyplot,
    reproduction_parser, save_figure, schedule, spread, train_arm, values_of, write_results)
from hf_neural_attention.experiments.metrics import block_perplexity
from hf_neural_attention.experiments.training import DataArguments, ModelArguments, prepare_data

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("expressive", "neural", "cdape")


def main(argv: list[str] | None = None) -> int:
    parser = reproduction_parser(__doc__, "reproduce_retrofit", REPO)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--finetune-learning-rate", type=float, default=5e-4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dataset", default="stdlib-prose")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-eval-samples", type=int, default=256, help="validation/test blocks scored")
    args = parse_reproduction_args(parser, argv)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data_args = DataArguments(dataset=args.dataset, block_size=args.block_size, vocab_size=args.vocab_size,
                              max_eval_samples=args.max_eval_samples, cache_dir=args.cache_dir)
    test_blocks = prepare_data(ModelArguments(architecture="gpt2"), data_args).test
    total = args.pretrain_steps + args.finetune_steps

    def model_args(variant: str, init_from: str | None = None) -> ModelArguments:
        return ModelArguments(architecture="gpt2", attention_variant=variant, hidden_size=args.hidden_size,
                              num_layers=args.layers, num_heads=args.heads, init_from=init_from,
                              max_position_embeddings=args.block_size)

    def train(name: str, seed: int, arguments: ModelArguments, steps: int, learning_rate: float) -> dict:
        started = time.perf_counter()
        results = train_arm(arguments, data_args, Path(args.runs_dir) / f"{name}-s{seed}", seed,
                            per_device_eval_batch_size=64, eval_strategy="no",
                            **schedule(steps, args.batch_size, learning_rate, logging_steps=max(1, steps // 10)))
        row = {"arm": name, "seed": seed, "steps": steps, "parameters": results["parameters"],
               "test_perplexity": results["test_perplexity"], "seconds": time.perf_counter() - started}
        if seed == args.seeds[0]:
            copy_model_card(results["run_dir"], output / "cards" / f"{name}.md")
        print(f"seed {seed} {name:<18} {steps:5d} steps  test ppl {row['test_perplexity']:.2f} "
              f"({row['seconds']:.0f} s)", flush=True)
        rows.append(row)
        return results

    started = time.perf_counter()
    rows: list[dict] = []
    for seed in args.seeds:
        pretrained = train("pretrain", seed, model_args("dot"), args.pretrain_steps, args.learning_rate)
        pretrained_dir = str(Path(pretrained["run_dir"]) / "model")
        train("dot-scratch", seed, model_args("dot"), total, args.learning_rate)
        for variant in args.variants:
            torch.manual_seed(seed)
            converted = VariantGPT2LMHeadModel.from_pretrained(pretrained_dir, attention_variant=variant)
            rows.append({"arm": f"{variant}-converted", "seed": seed, "steps": args.pretrain_steps,
                         "parameters": sum(p.numel() for p in converted.parameters()),
                         "test_perplexity": block_perplexity(converted, test_blocks[:]["input_ids"])})
            train(f"{variant}-retrofit", seed, model_args(variant, init_from=pretrained_dir), args.finetune_steps,
                  args.finetune_learning_rate)
            train(f"{variant}-scratch", seed, model_args(variant), total, args.learning_rate)

    arms = ["pretrain", "dot-scratch"] + [f"{v}-{kind}" for v in args.variants
                                          for kind in ("converted", "retrofit", "scratch")]
    summary, cells = {}, []
    for arm in arms:
        arm_rows = [r for r in rows if r["arm"] == arm]
        values = values_of(arm_rows, "test_perplexity")
        mean, sd = mean_sd(values)
        summary[arm] = {"values": values, "mean": mean, "sd": sd}
        steps = (f"{args.pretrain_steps} + {args.finetune_steps}" if arm.endswith("-retrofit")
                 else f"{args.pretrain_steps} + 0" if arm.endswith("-converted") else str(arm_rows[0]["steps"]))
        cells.append([arm, steps, f"{arm_rows[0]['parameters']:,}", spread(values),
                      ", ".join(f"{v:.2f}" for v in values)])
    comparison = []
    by_seed = {(r["arm"], r["seed"]): r["test_perplexity"] for r in rows}
    for variant in args.variants:
        differences = [by_seed[(f"{variant}-retrofit", s)] - by_seed[(f"{variant}-scratch", s)] for s in args.seeds]
        mean, sd = mean_sd(differences)
        reading = paired_reading(differences, negative="retrofit better", positive="scratch better")
        summary[variant] = {"differences": differences, "mean": mean, "sd": sd, "reading": reading}
        comparison.append([variant, f"{spread(differences, signed=True)} ("
                           + ", ".join(f"{d:+.2f}" for d in differences) + ")", reading])
    setting = (f"GPT-2 d_model {args.hidden_size}, {args.layers} layers, {args.heads} heads on {args.dataset} "
               f"(byte-level BPE {args.vocab_size}, blocks of {args.block_size}, batch {args.batch_size}); stock "
               f"Trainer, {describe_schedule()}; pretraining and "
               f"scratch lr {args.learning_rate}, fine-tuning lr {args.finetune_learning_rate}; P = "
               f"{args.pretrain_steps}, F = {args.finetune_steps}; seeds {args.seeds}; test perplexity on "
               f"{args.max_eval_samples} held-out blocks. Total run time {(time.perf_counter() - started) / 60:.0f} min.")
    tables = (markdown_table(["arm", "steps", "parameters", "test perplexity (mean ± sd)", "per seed"], cells, "lrrrl"),
              markdown_table(["variant", "retrofit − scratch (mean ± sd; per seed)", "reading"], comparison, "lrl"))
    write_results(output, f"{setting}\n\n" + "\n\n".join(tables), setting=vars(args), runs=rows, summary=summary)
    plot(summary, args.variants, output / "results.png")
    return 0


def plot(summary: dict, variants: list[str], path: Path) -> None:
    figure, axis = pyplot().subplots(figsize=(7, 4))
    kinds = (("converted", "C7"), ("retrofit", "C1"), ("scratch", "C0"))
    for index, variant in enumerate(variants):
        for offset, (kind, color) in zip((-0.2, 0.0, 0.2), kinds):
            entry = summary[f"{variant}-{kind}"]
            axis.errorbar([index + offset], [entry["mean"]], yerr=[entry["sd"]], marker="o", capsize=3, color=color,
                          label=kind if index == 0 else None)
            axis.scatter([index + offset] * len(entry["values"]), entry["values"], color=color, alpha=0.35, s=12)
    dot = summary["dot-scratch"]
    axis.axhline(dot["mean"], color="black", linestyle="--", linewidth=1, label="dot, scratch (total budget)")
    axis.axhline(summary["pretrain"]["mean"], color="grey", linestyle=":", linewidth=1, label="dot, pretrained")
    axis.set_xticks(range(len(variants)), variants)
    axis.set_yscale("log")
    axis.set_ylabel("test perplexity (log scale)")
    save_figure(figure, path, grid="both")


if __name__ == "__main__":
    sys.exit(main())
