"""The experiment harness of the paper reproductions (scripts/reproduce_*.py), written once: the shared options
(at least 3 seeds), the optimizer and schedule, one Trainer run per (arm, seed) through the one training entry point
(`training.run` for a recipe, `training.train_model` for a ready model or a model factory), the arms x seeds loop,
the mean ± sd spread, mechanical verdicts against a claimed effect, results files, figures and model cards.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from .recipes import DataArguments, ModelArguments
from .report import markdown_table, mean_sd, pyplot, save_figure, spread  # noqa: F401 (re-exported for the scripts)
from .training import run, train_model


def reproduction_parser(doc: str, name: str, repo: Path) -> argparse.ArgumentParser:
    """The options every reproduction has: --seeds (at least 3, see parse_reproduction_args), --output (tables,
    plots, cards: results/<name>), --runs-dir (Trainer folders: outputs/<name>) and --cache-dir (data, tokenizer)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="at least 3: the spread needs them")
    parser.add_argument("--output", default=str(repo / "results" / name), help="tables, plots and model cards")
    parser.add_argument("--runs-dir", default=str(repo / "outputs" / name), help="Trainer output folders")
    parser.add_argument("--cache-dir", default=DataArguments.cache_dir, help="data set and tokenizer cache")
    return parser


def parse_reproduction_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if len(args.seeds) < 3:
        parser.error("use at least 3 seeds per arm")
    return args


def schedule(steps: int, batch_size: int, learning_rate: float, **overrides: Any) -> dict[str, Any]:
    """The optimizer and schedule of every reproduction, written once: AdamW with beta2 0.95, weight decay 0.1 and
    gradient clipping at 1.0; cosine decay after a 5 % warm-up; a log line every 5 % of the steps. A script passes
    overrides only where its paper's setting differs."""
    return {"max_steps": steps, "per_device_train_batch_size": batch_size, "learning_rate": learning_rate,
            "lr_scheduler_type": "cosine", "warmup_steps": max(1, steps // 20), "weight_decay": 0.1,
            "adam_beta2": 0.95, "max_grad_norm": 1.0, "logging_steps": max(1, steps // 20), **overrides}


def describe_schedule(learning_rate: float | None = None, **overrides: Any) -> str:
    """The optimizer and schedule of `schedule(...)` (with the same overrides) in words, for a results file."""
    settings = schedule(100, 1, 0.0, **overrides)
    rate = "" if learning_rate is None else f" lr {learning_rate}"
    return (f"AdamW{rate} (beta2 {settings['adam_beta2']}, weight decay {settings['weight_decay']}, clip "
            f"{settings['max_grad_norm']}), {settings['lr_scheduler_type']} after a 5 % warm-up")


def training_arguments(output_dir: str | Path, seed: int, **training: Any) -> TrainingArguments:
    """TrainingArguments of one reproduction run: no checkpoints, no reporting, CPU unless CUDA is there."""
    return TrainingArguments(
        output_dir=str(output_dir), seed=seed, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), **training)


def train_arm(model_args: ModelArguments, data_args: DataArguments, output_dir: Path, seed: int,
              **training: Any) -> dict:
    """One stock-Trainer run (from scratch, or retrofitted when model_args.init_from is set); training.run's
    results dict plus the run folder (its `model/` holds the weights, code and model card)."""
    results = run(model_args, data_args, training_arguments(output_dir, seed, **training))
    results["run_dir"] = str(output_dir)
    return results


def train_built_arm(model, train_dataset, output_dir: Path, seed: int, **training: Any) -> tuple[Any, float]:
    """One stock-Trainer run of a model the script builds itself: `model` is a ready model or a factory (called
    after set_seed(seed), so the seed fixes the initial weights). Returns (the trained model, training seconds)."""
    trainer, _, seconds = train_model(model, training_arguments(output_dir, seed, **training), train_dataset)
    return trainer.model, seconds


def arms_by_seeds(arms: Iterable[str], seeds: Iterable[int], train_one: Callable[[str, int], dict],
                  describe: Callable[[dict], str], done: Collection[tuple[str, int]] = ()) -> list[dict]:
    """Every arm for every seed (seed by seed, so a cut-short run has whole seeds) but the (arm, seed) pairs in `done`
    (rows kept from an earlier run): `train_one(arm, seed)` returns one result row; `describe(row)` is printed as it
    comes. Returns the new rows in training order."""
    rows = []
    for seed in seeds:
        for arm in arms:
            if (arm, seed) in done:
                continue
            rows.append(train_one(arm, seed))
            print(describe(rows[-1]), flush=True)
    return rows


def earlier_rows(path: str | Path, settings: dict[str, Any], *, ignored: Iterable[str], settings_key: str,
                 rows_key: str) -> list[dict]:
    """The result rows of an earlier run of the same script (its results.json), after checking that it ran with the
    same settings except `ignored` ones (arms, output folders): the seed fixes each run, so they are the rows this
    run would produce. Raises SystemExit naming the settings that differ."""
    earlier = json.loads(Path(path).read_text())
    ignored = set(ignored)
    differ = sorted(key for key, value in earlier[settings_key].items()
                    if key not in ignored and settings.get(key) != value)
    if differ:
        raise SystemExit(f"{path} ran with other settings: " + ", ".join(
            f"{key}={earlier[settings_key][key]!r} (here {settings.get(key)!r})" for key in differ))
    return earlier[rows_key]


def values_of(rows: Iterable[dict], field: str, **match: Any) -> list:
    """row[field] of the rows whose entries equal `match` (e.g. values_of(rows, "accuracy", arm="dot", level=2))."""
    return [row[field] for row in rows if all(row.get(key) == value for key, value in match.items())]


def write_results(output: Path, markdown: str, **payload: Any) -> None:
    """output/results.md (the markdown, printed too) and output/results.json (the payload)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.md").write_text(markdown.rstrip("\n") + "\n")
    (output / "results.json").write_text(json.dumps(payload, indent=2))
    print(f"\n{markdown}")


def verdict(effects: list[float], claimed: float) -> str:
    """A plain verdict on per-seed effects (positive = the variant is better) against the claimed effect size.

    holds: the mean effect reaches the claim and every seed points the same way;
    does not hold at this scale: even mean + 2 standard errors stays below the claim;
    inconclusive: anything else (the spread is too wide to tell)."""
    mean, sd = mean_sd(effects)
    upper = mean + 2 * sd / math.sqrt(len(effects))
    if mean >= claimed and all(effect > 0 for effect in effects):
        return "holds"
    if upper < claimed:
        return "does not hold at this scale"
    return "inconclusive"


def paired_reading(differences: list[float], negative: str, positive: str) -> str:
    """A plain reading of per-seed paired differences: `negative` when even mean + 2 standard errors is below 0,
    `positive` when even mean - 2 standard errors is above 0, otherwise "no clear difference (within 2 s.e.)"."""
    mean, sd = mean_sd(differences)
    standard_error = sd / math.sqrt(len(differences))
    if mean + 2 * standard_error < 0:
        return negative
    if mean - 2 * standard_error > 0:
        return positive
    return "no clear difference (within 2 s.e.)"


BLOW_UP_GROWTH = 2.0  # perplexity at the longest length / at the training length: "blows up" from here on
FLAT_GROWTH = 1.1  # ... and "stays flat" up to here


def extrapolation_verdict(base_growth: list[float], cdape_growth: list[float]) -> str:
    """A plain verdict on "with cdape, perplexity stays flat past the training length where the base model blows up",
    from per-seed growth factors (perplexity at the longest length divided by perplexity at the training length).

    inconclusive (no blow-up to prevent): the base arm's mean growth stays below BLOW_UP_GROWTH;
    holds: the base blows up and every seed of the cdape arm stays within FLAT_GROWTH;
    does not hold at this scale: the base blows up and even mean - 2 standard errors of the cdape growth exceeds
    FLAT_GROWTH; inconclusive: anything else."""
    if statistics.mean(base_growth) < BLOW_UP_GROWTH:
        return "inconclusive (no blow-up to prevent)"
    if all(growth <= FLAT_GROWTH for growth in cdape_growth):
        return "holds"
    mean, sd = mean_sd(cdape_growth)
    if mean - 2 * sd / math.sqrt(len(cdape_growth)) > FLAT_GROWTH:
        return "does not hold at this scale"
    return "inconclusive"


def copy_model_card(run_dir: str | Path, destination: Path) -> Path:
    """Copies the model card that training.run wrote (run_dir/model/README.md) to `destination`."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(Path(run_dir) / "model" / "README.md", destination))
