"""Length extrapolation: does a convolution over the score map keep perplexity flat past the training length?

Claim (Zheng et al., DAPE V2 / CDAPE, arXiv 2410.04798): with CDAPE, perplexity stays flat (or falls) far beyond the
training length, where RoPE and no positional encoding (NoPE) blow up.

Here: a small Llama-style model trained at 128 tokens on the offline standard-library prose corpus, six arms with
the same data, steps, optimizer and seeds:
    rope          RoPE, dot-product attention
    rope+cdape    RoPE, CDAPE (1x3, D=32) in every layer
    nope          no positional encoding (use_rotary_embeddings=False), dot-product attention
    nope+cdape    NoPE, CDAPE
    kerple        NoPE + Kerple (log) bias alone: CDAPE with bias="kerple", its zero-initialised output convolution
                  frozen, so the correction stays 0
    kerple+cdape  NoPE + Kerple bias + CDAPE (the paper's CDAPE-Kerple)
The trained cdape arms start from the reference code's init (PyTorch default for both convolutions; the library's
default zero output convolution is for retrofits; --cdape-init zero compares). Perplexity on the validation stream
at 128, 256, 512, 1024 and 2048 tokens: non-overlapping windows of that length, every token scored (so longer
windows give each token more, and longer-range, context).

    python scripts/reproduce_cdape.py                        # default: 32 min on 2 idle cores (measured)
    python scripts/reproduce_cdape.py --steps 1000 --arms rope rope+cdape nope nope+cdape   # 75 min: RoPE blows up
    python scripts/reproduce_cdape.py --train-length 64 --steps 2000 --eval-lengths 64 128 256 512 1024 2048
                                                # 92 min: all six arms where RoPE blows up (the README's row)
    ... --arms rope rope+cdape --train-length 64 --steps 4000 (same lengths)   # 51 min: RoPE blows up in every seed
    python scripts/reproduce_cdape.py --steps 5000 --hidden-size 512 --layers 8 --seeds 0 1 2   # a GPU
    python scripts/reproduce_cdape.py --keep-rows-from A/results.json B/results.json --output C ...   # merge runs
Writes results/reproduce_cdape/{results.json, results.md, perplexity.png, cards/*.md}.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from hf_neural_attention import VariantLlamaConfig, VariantLlamaForCausalLM
from hf_neural_attention.hub import build_model_card
from hf_neural_attention.experiments.harness import (
    BLOW_UP_GROWTH, FLAT_GROWTH, arms_by_seeds, describe_schedule, earlier_rows, extrapolation_verdict,
    markdown_table, mean_sd, parse_reproduction_args, pyplot, reproduction_parser, save_figure, schedule, spread,
    train_built_arm, values_of, write_results)
from hf_neural_attention.experiments.metrics import block_perplexity
from hf_neural_attention.experiments.training import DataArguments, ModelArguments, prepare_data

REPO = Path(__file__).resolve().parents[1]
ARMS = {  # name: (rotary embeddings, variant, options, freeze the convolutions)
    "rope": (True, "dot", {}, False),
    "rope+cdape": (True, "cdape", {}, False),
    "nope": (False, "dot", {}, False),
    "nope+cdape": (False, "cdape", {}, False),
    "kerple": (False, "cdape", {"bias": "kerple"}, True),
    "kerple+cdape": (False, "cdape", {"bias": "kerple"}, False),
}


def perplexity_at(model, tokens: torch.Tensor, length: int, max_windows: int) -> float:
    """Perplexity over non-overlapping windows of `length` tokens (at most max_windows of them)."""
    starts = range(0, min(len(tokens) - length, max_windows * length), length)
    return block_perplexity(model, torch.stack([tokens[start : start + length] for start in starts]))


def build_model(arm: str, args, tokenizer) -> VariantLlamaForCausalLM:
    rotary, variant, options, freeze = ARMS[arm]
    if variant == "cdape" and not freeze:  # Kerple alone needs the zero output convolution; the others follow --cdape-init
        options = {**options, "zero_init": args.cdape_init == "zero"}
    config = VariantLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=int(args.hidden_size * 8 / 3),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.eval_lengths), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        use_rotary_embeddings=rotary, attention_variant=variant, attention_variant_options=options,
        attention_variant_layers="all")
    model = VariantLlamaForCausalLM(config)
    if freeze:  # Kerple alone: the zero-initialised output convolution stays zero, so logits = x + P
        for name, parameter in model.named_parameters():
            if ".conv_" in name:
                parameter.requires_grad_(False)
    return model


def train_arm(arm: str, seed: int, args, prepared, output: Path) -> dict:
    model, train_seconds = train_built_arm(lambda: build_model(arm, args, prepared.tokenizer), prepared.train,
                                           Path(args.runs_dir) / f"{arm}-s{seed}", seed,
                                           **schedule(args.steps, args.batch_size, args.learning_rate))
    tokens = torch.as_tensor(prepared.validation_tokens)
    perplexities = {length: perplexity_at(model, tokens, length, args.eval_tokens // length)
                    for length in args.eval_lengths}
    if seed == args.seeds[0]:  # one model card per arm, for its first seed
        table = markdown_table(["evaluation length", "perplexity"],
                               [(length, f"{value:.2f}") for length, value in perplexities.items()], "rr")
        build_model_card(model, datasets=["stdlib-prose"], metrics=["perplexity"], results=table,
                         training_data=f"`stdlib-prose`, {args.steps} steps of {args.batch_size} x "
                                       f"{args.train_length} tokens, seed {seed}; arm `{arm}` of "
                                       "scripts/reproduce_cdape.py").save(output / "cards" / f"{arm}.md")
    return {"arm": arm, "seed": seed, "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "perplexity": perplexities, "train_seconds": train_seconds}


def kept_rows(args) -> list[dict]:
    """The rows of --keep-rows-from files (checked to have run with the same settings) for the arms and seeds asked
    for; those (arm, seed) pairs are not trained again."""
    rows = []
    for path in args.keep_rows_from or []:
        for row in earlier_rows(path, vars(args), settings_key="setting", rows_key="runs",
                                ignored=("arms", "seeds", "output", "runs_dir", "cache_dir", "keep_rows_from")):
            if row["arm"] in args.arms and row["seed"] in args.seeds:
                perplexity = {int(length): value for length, value in row["perplexity"].items()}  # JSON keys: strings
                rows.append({**row, "perplexity": perplexity, "kept_from": str(path)})
    pairs = [(row["arm"], row["seed"]) for row in rows]
    if len(pairs) != len(set(pairs)):
        raise SystemExit("--keep-rows-from: the files hold the same (arm, seed) more than once")
    return rows


def growth(row: dict, lengths: list[int]) -> float:
    """Perplexity at the longest evaluation length over perplexity at the first (the training length)."""
    return row["perplexity"][lengths[-1]] / row["perplexity"][lengths[0]]


def summarize(rows: list[dict], lengths: list[int]) -> tuple[str, dict]:
    summary, cells = {}, []
    for arm in ARMS:
        arm_rows = [r for r in rows if r["arm"] == arm]
        if not arm_rows:
            continue
        summary[arm] = {}
        for length in lengths:
            values = [r["perplexity"][length] for r in arm_rows]
            summary[arm][length] = (*mean_sd(values), values)
        summary[arm]["growth"] = [growth(r, lengths) for r in arm_rows]
        cells.append([arm, f"{arm_rows[0]['trainable_parameters']:,}"]
                     + [spread(summary[arm][length][2]) for length in lengths] + [spread(summary[arm]["growth"])])
    header = ["arm", "parameters", *(f"ppl @ {n}" for n in lengths), f"growth {lengths[-1]}/{lengths[0]}"]
    return markdown_table(header, cells, "lr" + "r" * (len(lengths) + 1)), summary


def verdicts(summary: dict) -> dict[str, str]:
    """One verdict per base arm that has its cdape counterpart: does cdape keep it flat where it blows up?"""
    return {base: extrapolation_verdict(summary[base]["growth"], summary[f"{base}+cdape"]["growth"])
            for base in ("rope", "nope", "kerple") if base in summary and f"{base}+cdape" in summary}


def plot(summary: dict, lengths: list[int], train_length: int, path: Path) -> None:
    figure, axis = pyplot().subplots(figsize=(6.5, 4.2))
    for index, (arm, by_length) in enumerate(summary.items()):
        means = [by_length[n][0] for n in lengths]
        sds = [by_length[n][1] for n in lengths]
        axis.errorbar(lengths, means, yerr=sds, marker="o", capsize=3, color=f"C{index}", label=arm,
                      linestyle="-" if "cdape" in arm else "--")
    axis.axvline(train_length, color="grey", linestyle=":", label="training length")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("evaluation length (tokens)")
    axis.set_ylabel("validation perplexity")
    save_figure(figure, path, grid="both")


def main(argv: list[str] | None = None) -> int:
    parser = reproduction_parser(__doc__, "reproduce_cdape", REPO)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--train-length", type=int, default=128)
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--eval-tokens", type=int, default=8192, help="validation tokens per evaluation length")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--keep-rows-from", nargs="+", metavar="RESULTS_JSON",
                        help="results.json files of earlier runs with the same settings: their (arm, seed) rows are "
                             "kept and not trained again (to add arms to a run, or to merge runs into one table)")
    parser.add_argument("--cdape-init", choices=["reference", "zero"], default="reference",
                        help="output convolution of the trained cdape arms: PyTorch's default init as in the reference "
                             "code, or zero (the library default, meant for retrofits)")
    args = parse_reproduction_args(parser, argv)

    output = Path(args.output)
    (output / "cards").mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(ModelArguments(architecture="llama"),
                            DataArguments(dataset="stdlib-prose", block_size=args.train_length,
                                          vocab_size=args.vocab_size, cache_dir=args.cache_dir))
    kept = kept_rows(args)
    for row in kept:  # the kept arms' model cards, next to the new ones
        card, copy = Path(row["kept_from"]).parent / "cards" / f"{row['arm']}.md", output / "cards" / f"{row['arm']}.md"
        if row["seed"] == args.seeds[0] and card.exists() and card.resolve() != copy.resolve():
            shutil.copyfile(card, copy)
    rows = kept + arms_by_seeds(
        args.arms, args.seeds, lambda arm, seed: train_arm(arm, seed, args, prepared, output),
        lambda row: f"seed {row['seed']} {row['arm']:<13} " + " ".join(
            f"{n}:{p:.1f}" for n, p in row["perplexity"].items()) + f" ({row['train_seconds']:.0f}s)",
        done={(row["arm"], row["seed"]) for row in kept})
    rows.sort(key=lambda row: (row["seed"], list(ARMS).index(row["arm"])))
    table, summary = summarize(rows, args.eval_lengths)
    setting = (f"Llama, {args.layers} layers, d_model {args.hidden_size}, {args.heads} heads, trained at "
               f"{args.train_length} tokens for {args.steps} steps of batch {args.batch_size} on stdlib-prose "
               f"(byte-level BPE {args.vocab_size}); {describe_schedule(args.learning_rate)}; cdape output "
               f"convolution init: {args.cdape_init}; seeds {args.seeds}; "
               f"perplexity (mean ± sd over seeds) on up to {args.eval_tokens} validation tokens per length")
    verdict_by_base = verdicts(summary)
    rule = (f"Growth = perplexity at {args.eval_lengths[-1]} / at {args.eval_lengths[0]} tokens, per seed. Verdict per "
            f"pair: the base arm blows up if its mean growth is >= {BLOW_UP_GROWTH}; the claim holds if then every "
            f"seed of the cdape arm stays <= {FLAT_GROWTH}, does not hold if mean - 2 s.e. of its growth exceeds "
            f"{FLAT_GROWTH}; otherwise inconclusive.")
    verdict_lines = "\n".join(
        f"- {base} -> {base}+cdape: growth {mean_sd(summary[base]['growth'])[0]:.2f} -> "
        f"{mean_sd(summary[base + '+cdape']['growth'])[0]:.2f} (per seed "
        + ", ".join(f"{g:.2f}" for g in summary[base + "+cdape"]["growth"]) + f"): **{verdict}**"
        for base, verdict in verdict_by_base.items())
    per_arm = ", ".join(f"{arm} {mean_sd(values_of(rows, 'train_seconds', arm=arm))[0]:.0f} s" for arm in summary)
    minutes = sum(values_of(rows, "train_seconds")) / 60
    timing = f"Training time: {minutes:.1f} min in all (arms: {per_arm} per seed)."
    if kept:
        timing += (" Rows kept from " + ", ".join(sorted({row["kept_from"] for row in kept}))
                   + " (same settings; not trained again, their time included).")
    write_results(output, f"{setting}\n\n{table}\n\n{rule}\n\n{verdict_lines}\n\n{timing}", setting=vars(args),
                  runs=rows, verdicts=verdict_by_base)
    plot(summary, args.eval_lengths, args.train_length, output / "perplexity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
