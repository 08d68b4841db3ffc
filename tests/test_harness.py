"""The experiment harness (experiments/harness.py, experiments/report.py) that every reproduction script shares:
options, schedule, the arms x seeds loop, spread, tables, results files, figures, and training a model the script
builds itself (a ready model or a factory) through the one training entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import hf_neural_attention as hfna
from hf_neural_attention.experiments import harness
from hf_neural_attention.experiments.report import markdown_table, pyplot, save_figure, spread


def test_at_least_three_seeds(capsys):
    parser = harness.reproduction_parser("doc", "reproduce_x", Path("/repo"))
    assert harness.parse_reproduction_args(parser, []).seeds == [0, 1, 2]
    args = harness.parse_reproduction_args(parser, ["--seeds", "4", "5", "6", "7"])
    assert args.seeds == [4, 5, 6, 7] and args.output == "/repo/results/reproduce_x"
    assert args.runs_dir == "/repo/outputs/reproduce_x"
    with pytest.raises(SystemExit):
        harness.parse_reproduction_args(parser, ["--seeds", "0", "1"])
    assert "at least 3 seeds" in capsys.readouterr().err


def test_schedule_and_its_description_agree():
    settings = harness.schedule(200, 8, 1e-3, weight_decay=0.0)
    assert settings["warmup_steps"] == 10 and settings["weight_decay"] == 0.0 and settings["adam_beta2"] == 0.95
    assert harness.describe_schedule(1e-3, weight_decay=0.0) == (
        "AdamW lr 0.001 (beta2 0.95, weight decay 0.0, clip 1.0), cosine after a 5 % warm-up")
    assert harness.describe_schedule().startswith("AdamW (beta2 0.95, weight decay 0.1")


def test_markdown_table_and_spread():
    table = markdown_table(["arm", "value"], [("dot", spread([1.0, 2.0, 3.0])), ("x", spread([0.5], 1, signed=True))],
                           "lr")
    assert table.splitlines() == ["| arm | value |", "|---|---:|", "| dot | 2.00 ± 1.00 |", "| x | +0.5 ± 0.0 |"]
    assert spread([0.1, 0.3], 1, scale=100) == "20.0 ± 14.1"
    with pytest.raises(ValueError, match="one l or r per column"):
        markdown_table(["a", "b"], [], "l")
    with pytest.raises(ValueError, match="1 cells for 2 columns"):
        markdown_table(["a", "b"], [("only",)])


def test_arms_by_seeds_goes_seed_by_seed_and_values_of_selects(capsys):
    rows = harness.arms_by_seeds(["a", "b"], [0, 1, 2], lambda arm, seed: {"arm": arm, "seed": seed, "v": seed},
                                 lambda row: f"{row['arm']}{row['seed']}")
    assert [(r["arm"], r["seed"]) for r in rows] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert capsys.readouterr().out.split() == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert harness.values_of(rows, "v", arm="b") == [0, 1, 2]
    assert harness.values_of(rows, "arm", seed=1) == ["a", "b"]
    kept = harness.arms_by_seeds(["a", "b"], [0, 1], lambda arm, seed: {"arm": arm, "seed": seed},
                                 lambda row: "", done={("a", 0), ("b", 1)})
    assert [(r["arm"], r["seed"]) for r in kept] == [("b", 0), ("a", 1)]


def test_earlier_rows_checks_the_settings(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"setting": {"steps": 10, "arms": ["a"], "output": "x"}, "runs": [{"arm": "a"}]}))
    settings = {"steps": 10, "arms": ["b"], "output": "y"}
    assert harness.earlier_rows(path, settings, ignored=("arms", "output"), settings_key="setting",
                                rows_key="runs") == [{"arm": "a"}]
    with pytest.raises(SystemExit, match=r"other settings: arms=\['a'\] \(here \['b'\]\)$"):
        harness.earlier_rows(path, settings, ignored=("output",), settings_key="setting", rows_key="runs")


def test_paired_reading():
    assert harness.paired_reading([-1.0, -1.2, -0.9], "lower", "higher") == "lower"
    assert harness.paired_reading([1.0, 1.2, 0.9], "lower", "higher") == "higher"
    assert harness.paired_reading([-1.0, 1.0, 0.1], "lower", "higher") == "no clear difference (within 2 s.e.)"


def test_write_results_and_save_figure(tmp_path, capsys):
    harness.write_results(tmp_path / "out", "setting\n\n| a |", setting={"steps": 1}, runs=[{"arm": "dot"}])
    assert (tmp_path / "out" / "results.md").read_text() == "setting\n\n| a |\n"
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"setting": {"steps": 1},
                                                                          "runs": [{"arm": "dot"}]}
    assert "| a |" in capsys.readouterr().out
    figure, axis = pyplot().subplots()
    axis.plot([1, 2], [3, 4], label="line")
    save_figure(figure, tmp_path / "figure.png", grid="both")
    assert (tmp_path / "figure.png").read_bytes()[:4] == b"\x89PNG"


def _tiny_gpt2():
    config = hfna.VariantGPT2Config(vocab_size=16, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                    attention_variant="neural")
    return hfna.VariantGPT2LMHeadModel(config)


@pytest.mark.slow
def test_train_built_arm_seeds_a_factory_and_trains_a_ready_model(tmp_path):
    """A factory is called after set_seed(seed): the same seed gives the same initial and trained weights, another
    seed other ones; a ready model trains as it is."""
    ids = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(0))
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    settings = harness.schedule(2, 4, 1e-2)
    built = [harness.train_built_arm(_tiny_gpt2, train, tmp_path / f"run{i}", seed, **settings)
             for i, seed in enumerate((3, 3, 4))]
    (first, seconds), (again, _), (other, _) = built
    assert seconds > 0
    first_state, other_state = first.state_dict(), other.state_dict()
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in first_state.items())
    assert not all(torch.equal(value, other_state[key]) for key, value in first_state.items())
    ready = _tiny_gpt2()
    before = {key: value.clone() for key, value in ready.state_dict().items()}
    trained, _ = harness.train_built_arm(ready, train, tmp_path / "ready", 3, **settings)
    assert trained is ready
    assert not all(torch.equal(value, trained.state_dict()[key]) for key, value in before.items())
