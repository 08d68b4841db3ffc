"""Retrofit: should I convert my trained dot-product checkpoint to variant X and fine-tune it, or keep fine-tuning the
dot-product model? The control the question needs is the dot model continued for the same fine-tuning budget.

Protocol per seed (stock Trainer, same data, batch and optimizer everywhere):
    pretrain              a GPT-2 with dot-product attention, P steps (its own warm-up + cosine schedule)
then, from that checkpoint, F fine-tuning steps with a FRESH schedule (5 % warm-up, cosine decay over the F steps)
in every arm:
    dot-continued         the control: the pretrained model, unchanged, trained on
    cdape-preserving      converted to cdape (zero-initialised output convolution: the function is preserved)
    neural-add-preserving converted to neural with combine="add" (last MLP layer zero-initialised: preserved)
    neural-replacing      converted to neural with combine="replace" (the paper's scorer replaces q.k)
    expressive-replacing  converted to expressive (a different function from the first step)
Neural runs in the first layer (its paper default), cdape and expressive in every layer. Reported per arm: validation
perplexity at the start of fine-tuning (the function-preserving arms must equal dot's), after 10 % of F and at the
end, the final test perplexity, mean ± sd over seeds, and a per-seed paired reading of arm − dot-continued.

    python scripts/reproduce_retrofit.py                     # default: 36 min on the 2-core CPU (partly shared)
    python scripts/reproduce_retrofit.py --pretrain-steps 20000 --finetune-steps 2000 --hidden-size 512 --layers 8 \
        --heads 8 --dataset wikitext-103                       # a GPU
Writes results/reproduce_retrofit/{results.json, results.md, results.png, cards/*.md}.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from hf_neural_attention.experiments.harness import (
    copy_model_card, describe_schedule, markdown_table, mean_sd, paired_reading, parse_reproduction_args, pyplot,
    reproduction_parser, save_figure, schedule, spread, train_arm, values_of, write_results)
from hf_neural_attention.experiments.training import DataArguments, ModelArguments

REPO = Path(__file__).resolve().parents[1]
ARMS = {  # name: (variant, options)
    "dot-continued": ("dot", None),
    "cdape-preserving": ("cdape", None),
    "neural-add-preserving": ("neural", {"combine": "add"}),
    "neural-replacing": ("neural", {"combine": "replace"}),
    "expressive-replacing": ("expressive", None),
}
PRESERVING = ("cdape-preserving", "neural-add-preserving")


def main(argv: list[str] | None = None) -> int:
    parser = reproduction_parser(__doc__, "reproduce_retrofit", REPO)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--finetune-learning-rate", type=float, default=5e-4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dataset", default="stdlib-prose")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-eval-samples", type=int, default=128, help="validation/test blocks scored")
    args = parse_reproduction_args(parser, argv)
    if "dot-continued" not in args.arms:
        parser.error("--arms must include dot-continued: every verdict is against it")
    if args.finetune_steps < 10:
        parser.error("--finetune-steps must be >= 10 (the table reads the perplexity after 10 % of them)")

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data_args = DataArguments(dataset=args.dataset, block_size=args.block_size, vocab_size=args.vocab_size,
                              max_eval_samples=args.max_eval_samples, cache_dir=args.cache_dir)
    tenth = args.finetune_steps // 10

    def model_args(variant: str, options: dict | None = None, init_from: str | None = None) -> ModelArguments:
        return ModelArguments(architecture="gpt2", attention_variant=variant, attention_options=options,
                              hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                              init_from=init_from, max_position_embeddings=args.block_size)

    def train(name: str, seed: int, arguments: ModelArguments, steps: int, learning_rate: float, **extra) -> dict:
        started = time.perf_counter()
        results = train_arm(arguments, data_args, Path(args.runs_dir) / f"{name}-s{seed}", seed,
                            per_device_eval_batch_size=64, **extra,
                            **schedule(steps, args.batch_size, learning_rate, logging_steps=max(1, steps // 10)))
        if seed == args.seeds[0]:
            copy_model_card(results["run_dir"], output / "cards" / f"{name}.md")
        results["seconds"] = time.perf_counter() - started
        return results

    started = time.perf_counter()
    rows: list[dict] = []
    for seed in args.seeds:
        pretrained = train("pretrain", seed, model_args("dot"), args.pretrain_steps, args.learning_rate,
                           eval_strategy="no")
        pretrained_dir = str(Path(pretrained["run_dir"]) / "model")
        for arm in args.arms:
            variant, options = ARMS[arm]
            # validation perplexity at the start (eval_on_start), every 10 % and at the end of a fresh schedule
            results = train(arm, seed, model_args(variant, options, init_from=pretrained_dir), args.finetune_steps,
                            args.finetune_learning_rate, eval_strategy="steps", eval_steps=tenth, eval_on_start=True)
            curve = dict(zip(results["loss_curve"]["eval_steps"], results["loss_curve"]["eval_loss"]))
            rows.append({"arm": arm, "seed": seed, "parameters": results["parameters"],
                         "start": math.exp(curve[0]), "tenth": math.exp(curve[tenth]),
                         "end": results["validation_perplexity"], "test_perplexity": results["test_perplexity"],
                         "pretrain_test_perplexity": pretrained["test_perplexity"], "seconds": results["seconds"]})
            print(f"seed {seed} {arm:<22} validation ppl start {rows[-1]['start']:.2f}  10 % {rows[-1]['tenth']:.2f}"
                  f"  end {rows[-1]['end']:.2f}  test {rows[-1]['test_perplexity']:.2f} "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)

    by_seed = {(r["arm"], r["seed"]): r for r in rows}
    cells, comparison, summary = [], [], {}
    for arm in args.arms:
        values = {key: values_of(rows, key, arm=arm) for key in ("start", "tenth", "end", "test_perplexity")}
        summary[arm] = {key: {"values": v, "mean": mean_sd(v)[0], "sd": mean_sd(v)[1]} for key, v in values.items()}
        cells.append([arm, f"{by_seed[(arm, args.seeds[0])]['parameters']:,}",
                      *(spread(values[key]) for key in ("start", "tenth", "end", "test_perplexity"))])
        if arm == "dot-continued":
            continue
        differences = [by_seed[(arm, s)]["test_perplexity"] - by_seed[("dot-continued", s)]["test_perplexity"]
                       for s in args.seeds]
        start_gap = max(abs(by_seed[(arm, s)]["start"] / by_seed[("dot-continued", s)]["start"] - 1)
                        for s in args.seeds)
        reading = paired_reading(differences, negative=f"{arm} better", positive="dot-continued better")
        summary[arm]["versus_dot"] = {"differences": differences, "reading": reading, "start_gap": start_gap}
        comparison.append([arm, f"{spread(differences, signed=True)} ("
                           + ", ".join(f"{d:+.2f}" for d in differences) + ")",
                           f"{start_gap:.1e}" + (" (preserving)" if arm in PRESERVING else ""), reading])
    setting = (f"GPT-2 d_model {args.hidden_size}, {args.layers} layers, {args.heads} heads (stock dropout 0.1) on "
               f"{args.dataset} (byte-level BPE {args.vocab_size}, blocks of {args.block_size}, batch "
               f"{args.batch_size}); stock Trainer, {describe_schedule()}; pretraining P = {args.pretrain_steps} "
               f"steps at lr {args.learning_rate}; every arm then fine-tunes F = {args.finetune_steps} steps at lr "
               f"{args.finetune_learning_rate} with a fresh schedule; seeds {args.seeds}; perplexities on "
               f"{args.max_eval_samples} held-out validation/test blocks. Total run time "
               f"{(time.perf_counter() - started) / 60:.0f} min.")
    tables = (
        markdown_table(["arm", "parameters", "validation ppl at start of fine-tuning", f"after 10 % ({tenth} steps)",
                        "at the end", "test ppl at the end"], cells, "lrrrrr"),
        markdown_table(["arm", "test ppl − dot-continued (mean ± sd; per seed)",
                        "largest start gap to dot (relative)", "reading"], comparison, "lrrl"),
    )
    write_results(output, f"{setting}\n\n" + "\n\n".join(tables), setting=vars(args), runs=rows, summary=summary)
    plot(summary, args.arms, output / "results.png")
    return 0


def plot(summary: dict, arms: list[str], path: Path) -> None:
    figure, axis = pyplot().subplots(figsize=(7, 4))
    for index, arm in enumerate(arms):
        means = [summary[arm][key]["mean"] for key in ("start", "tenth", "end")]
        sds = [summary[arm][key]["sd"] for key in ("start", "tenth", "end")]
        axis.errorbar([0, 1, 2], means, yerr=sds, marker="o", capsize=3, label=arm, color=f"C{index}",
                      linestyle="--" if arm == "dot-continued" else "-")
    axis.set_xticks([0, 1, 2], ["start of fine-tuning", "after 10 %", "end"])
    axis.set_yscale("log")
    axis.set_ylabel("validation perplexity (log scale)")
    axis.legend(fontsize=8)
    save_figure(figure, path, grid="both")


if __name__ == "__main__":
    sys.exit(main())
