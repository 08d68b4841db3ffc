"""How often the neural scorer's one-unit bottleneck dies, at init and after training, with the paper's ReLU and
init, and with the two remedies: activation="leaky_relu" and init="alive" (positive hidden biases, ReLU kept).

With the paper's widths (d_h = 64: d' = 2, MLP 4 -> 2 -> 1 -> 1) the last hidden layer is a single ReLU unit. When it
is dead for every input the scorer is constant and the layer's attention is plain averaging. Per seed and arm
this script builds a small GPT-2 with neural attention in the first layer (the paper's placement), and before and
after training records, per arm (relu: the paper; leaky_relu; alive_init: ReLU with init="alive"):
    certificate   the unit's incoming weights and bias are all <= 0 (dead for every input; scorer_health.py)
    uniform       the first layer's attention on held-out blocks is within 1e-4 of uniform over the visible keys
                  (dead on the data, whatever the weights say); max |a - uniform| is kept too
and the test perplexity. Same data, steps, schedule and seed in every arm; the seed fixes the initial weights (the
same draws in every arm; alive_init then overwrites the hidden biases).

    python scripts/neural_dead_unit.py                 # 10 seeds x 3 arms: 30 min on the 2-core CPU (shared with the test suite)
    python scripts/neural_dead_unit.py --seeds 0 1 2 --steps 50     # a quick look
Writes results/neural_dead_unit/{results.json, results.md}.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from hf_neural_attention import VariantGPT2Config, VariantGPT2LMHeadModel
from hf_neural_attention.experiments.harness import (
    arms_by_seeds, describe_schedule, earlier_rows, markdown_table, parse_reproduction_args, reproduction_parser,
    schedule, spread, train_built_arm, values_of, write_results)
from hf_neural_attention.experiments.metrics import block_perplexity
from hf_neural_attention.experiments.scorer_health import dead_groups
from hf_neural_attention.experiments.training import DataArguments, ModelArguments, prepare_data

REPO = Path(__file__).resolve().parents[1]
ARMS = {"relu": {}, "leaky_relu": {"activation": "leaky_relu"}, "alive_init": {"init": "alive"}}  # neural options


def build_model(arm: str, args) -> VariantGPT2LMHeadModel:
    config = VariantGPT2Config(
        vocab_size=args.vocab_size, n_positions=args.block_size, n_embd=args.hidden_size, n_layer=args.layers,
        n_head=args.heads, bos_token_id=0, eos_token_id=0,  # stock dropout 0.1
        attention_variant="neural", attention_variant_options=dict(ARMS[arm]))
    return VariantGPT2LMHeadModel(config)


@torch.no_grad()
def first_layer_state(model, probe: torch.Tensor) -> dict:
    """The certificate and the data check on the first layer's scorer."""
    model.eval()
    scorer = model.transformer.h[0].attn.attention_variant
    device = next(model.parameters()).device
    weights = model(input_ids=probe.to(device), output_attentions=True).attentions[0].float().cpu()  # [B, H, L, L]
    n = weights.shape[-1]
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    deviation = float((weights - visible / visible.sum(-1, keepdim=True)).abs().max())
    return {"certificate": bool(dead_groups(scorer)), "uniform": deviation < 1e-4, "deviation": deviation}


def kept_rows(args) -> list[dict]:
    """Rows of other arms from --keep-rows-from (checked to have run with the same settings)."""
    if args.keep_rows_from is None:
        return []
    rows = earlier_rows(args.keep_rows_from, vars(args), settings_key="arguments", rows_key="rows",
                        ignored=("arms", "activations", "keep_rows_from", "output", "runs_dir"))
    rows = [{"arm": row.pop("activation"), **row} if "activation" in row else row for row in rows]
    return [row for row in rows if row["arm"] not in args.arms]


def main(argv: list[str] | None = None) -> int:
    parser = reproduction_parser(__doc__, "neural_dead_unit", REPO)
    parser.set_defaults(seeds=list(range(10)))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2, help="d_h = hidden / heads; 64 gives the paper's widths")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dataset", default="stdlib-prose")
    parser.add_argument("--keep-rows-from", help="an earlier results.json of this script with the same settings: its "
                                                 "rows of arms not in --arms are kept (to add an arm to a run)")
    args = parse_reproduction_args(parser, argv)
    started = time.time()
    kept = kept_rows(args)

    data = prepare_data(ModelArguments(architecture="gpt2"), DataArguments(
        dataset=args.dataset, block_size=args.block_size, vocab_size=args.vocab_size, max_eval_samples=128,
        cache_dir=args.cache_dir))
    test_blocks = data.test[:]["input_ids"]
    probe = test_blocks[:16]

    def train_one(arm: str, seed: int) -> dict:
        torch.manual_seed(seed)
        initial = first_layer_state(build_model(arm, args), probe)  # the same init train_built_arm builds
        model, seconds = train_built_arm(lambda: build_model(arm, args), data.train,
                                         Path(args.runs_dir) / f"{arm}-s{seed}", seed,
                                         **schedule(args.steps, args.batch_size, args.learning_rate))
        final = first_layer_state(model, probe)
        return {"arm": arm, "options": ARMS[arm], "seed": seed, "seconds": seconds,
                **{f"init_{key}": value for key, value in initial.items()},
                **{f"trained_{key}": value for key, value in final.items()},
                "test_perplexity": block_perplexity(model, test_blocks)}

    rows = kept + arms_by_seeds(args.arms, args.seeds, train_one, lambda row: str(row))
    table = []
    for arm in [arm for arm in ARMS if arm in {row["arm"] for row in rows}]:
        def count(field: str) -> str:
            hits = values_of(rows, field, arm=arm)
            return f"{sum(hits)} / {len(hits)}"

        deviations = values_of(rows, "trained_deviation", arm=arm)
        arm_rows = [row for row in rows if row["arm"] == arm]
        died = sum(row["trained_uniform"] and not row["init_uniform"] for row in arm_rows)
        table.append((arm, count("init_certificate"), count("init_uniform"), count("trained_certificate"),
                      count("trained_uniform"), f"{died} / {len(arm_rows)}", f"{statistics.median(deviations):.2g} ({min(deviations):.2g})",
                      spread(values_of(rows, "test_perplexity", arm=arm), digits=2)))
    markdown = "\n".join([
        "# The neural scorer's one-unit bottleneck: death rate over seeds", "",
        f"GPT-2 (d {args.hidden_size}, {args.layers} layers, {args.heads} heads, d_h {args.hidden_size // args.heads}, "
        f"stock dropout 0.1), neural attention in the first layer with the paper's widths; {args.dataset}, "
        f"{args.steps} steps of batch {args.batch_size}, {describe_schedule(args.learning_rate)}; seeds {args.seeds}.",
        "certificate: the last hidden unit's incoming weights and bias are all <= 0 (dead for every input); "
        "uniform: the first layer's attention on 16 held-out blocks is within 1e-4 of uniform.", "",
        markdown_table(["arm", "certificate at init", "uniform at init", "certificate after training",
                        "uniform after training", "died during training",
                        "max abs(a - uniform) after training: median (min)", "test perplexity (mean ± sd)"],
                       table, "lrrrrrrr"),
        "", f"Wall time {time.time() - started:.0f} s" + (
            f" for {', '.join(args.arms)}; the other rows are kept from {args.keep_rows_from} (same settings)."
            if kept else "."),
    ])
    write_results(Path(args.output), markdown, rows=rows, arguments=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
