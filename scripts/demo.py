"""The main job: train a small GPT-2 with each attention variant on the same offline data, steps and seed, then
print one comparison table and draw all loss curves in one figure.

    python scripts/demo.py [--recipe configs/gpt2_demo.yaml] [--variants dot expressive neural cdape]
                           [--output outputs/demo] [any train.py override ...]

Each variant trains in its own process (scripts/train.py, the stock Trainer), so its memory is its own.
Writes <output>/summary.md, <output>/summary.json and <output>/loss_curves.png; each run goes to <output>/<variant>.
The default <output>, outputs/demo, is ignored by git: a local run leaves the committed reference run in
results/demo/ (docs/demo.md) as it is; `--output results/demo` replaces that reference run on purpose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hf_neural_attention import VARIANTS
from hf_neural_attention.experiments.report import markdown_table, plot_loss_curves

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "outputs" / "demo"


def number(value, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"  # n/a: the recipe turned Trainer's metric off


def table(rows: list[dict]) -> str:
    """tokens/s and memory are Trainer's own metrics (include_num_input_tokens_seen; skip_memory_metrics: false, off in
    the recipes for its cost): the memory column, the peak during training above what the process held when
    training started, appears when a run measured it."""
    with_memory = any(row["train_memory_peak_mib"] is not None for row in rows)
    header = ["variant", "parameters", "variant parameters", "validation perplexity", "test perplexity",
              "train tokens/s", *(["training memory peak (MiB)"] if with_memory else []), "train time (s)"]
    return markdown_table(header, [
        [row["attention_variant"], f"{row['parameters']:,}", f"{row['variant_parameters']:,}",
         f"{row['validation_perplexity']:.2f}", f"{row['test_perplexity']:.2f}", number(row["train_tokens_per_second"]),
         *([number(row["train_memory_peak_mib"])] if with_memory else []), f"{row['train_seconds']:.0f}"]
        for row in rows], "l" + "r" * (len(header) - 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "configs" / "gpt2_demo.yaml"),
                        help="the default takes about 5 minutes for four variants on a 2-core CPU; "
                             "configs/gpt2_stdlib.yaml is the longer run (about 25 minutes)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help="where the table, the figure and every run go (default: outputs/demo, ignored by git)")
    args, overrides = parser.parse_known_args()

    rows, curves = [], {}
    for variant in args.variants:
        run_dir = Path(args.output) / variant
        print(f"\n=== training {variant} -> {run_dir}", flush=True)
        command = [sys.executable, str(REPO / "scripts" / "train.py"), args.recipe, "--attention_variant", variant,
                   "--output_dir", str(run_dir), *overrides]
        if subprocess.run(command).returncode != 0:
            print(f"training {variant} failed", file=sys.stderr)
            return 1
        result = json.loads((run_dir / "results.json").read_text())
        rows.append(result)
        curves[variant] = result["loss_curve"]

    results_dir = Path(args.output)
    results_dir.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    setting = (f"{first['architecture']} ({first['parameters']:,} parameters with dot), dataset "
               f"{first['dataset']}, {first['steps']} steps, seed {first['seed']}, "
               f"{first['arguments']['data']['block_size']}-token blocks")
    summary = table(rows)
    plot_loss_curves(curves, results_dir / "loss_curves.png", f"GPT-2 on {first['dataset']}: one run per variant",
                     reference="dot")
    (results_dir / "summary.md").write_text(f"{setting}\n\n{summary}\n")
    (results_dir / "summary.json").write_text(json.dumps(
        [{k: v for k, v in row.items() if k != "loss_curve"} for row in rows], indent=2, default=str))
    print(f"\n{setting}\n\n{summary}\n\nloss curves: {results_dir / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
