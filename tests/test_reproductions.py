"""The reproduction scripts end to end at toy sizes, and the verdict rule they share."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from hf_neural_attention.experiments.harness import extrapolation_verdict, mean_sd, verdict

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verdict_rule():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert verdict([2.5, 3.0, 2.2], claimed=2.0) == "holds"
    assert verdict([2.5, -0.1, 4.0], claimed=2.0) == "inconclusive"  # one seed goes the other way
    assert verdict([0.1, -0.2, 0.05], claimed=2.0) == "does not hold at this scale"
    assert verdict([0.0, 3.0, 6.0], claimed=2.0) == "inconclusive"  # too wide to exclude the claim


def test_extrapolation_verdict_rule():
    assert extrapolation_verdict([1.2, 1.5, 1.4], [0.9, 0.95, 1.0]) == "inconclusive (no blow-up to prevent)"
    assert extrapolation_verdict([3.0, 5.0, 2.5], [0.9, 1.05, 1.0]) == "holds"
    assert extrapolation_verdict([3.0, 5.0, 2.5], [2.4, 2.6, 2.5]) == "does not hold at this scale"
    assert extrapolation_verdict([3.0, 5.0, 2.5], [1.0, 1.05, 2.0]) == "inconclusive"  # one seed not flat, wide spread


@pytest.mark.slow
def test_reproduce_retrofit_toy(tmp_path, data_cache):
    """Every arm fine-tunes from the same pretrained dot model with a fresh schedule that actually trains; the
    function-preserving arms start at dot-continued's perplexity, seed by seed; every file is written."""
    script = load_script("reproduce_retrofit")
    assert script.main([
        "--arms", "dot-continued", "cdape-preserving", "neural-add-preserving",
        "--pretrain-steps", "3", "--finetune-steps", "10", "--hidden-size", "32", "--layers", "2", "--heads", "2",
        "--block-size", "32", "--vocab-size", "512", "--batch-size", "4", "--max-eval-samples", "4",
        "--output", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"), "--cache-dir", data_cache]) == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    by_arm = {(r["arm"], r["seed"]): r for r in results["runs"]}
    for seed in (0, 1, 2):
        dot = by_arm[("dot-continued", seed)]
        for arm in ("cdape-preserving", "neural-add-preserving"):
            assert by_arm[(arm, seed)]["start"] == pytest.approx(dot["start"], rel=1e-5)
        assert dot["end"] != pytest.approx(dot["start"], rel=1e-6)  # the fresh schedule trains
    table = (tmp_path / "results" / "results.md").read_text()
    assert "dot-continued" in table and "(preserving)" in table
    assert {"pretrain.md", "cdape-preserving.md"} <= {p.name for p in (tmp_path / "results" / "cards").iterdir()}
    assert (tmp_path / "results" / "results.png").stat().st_size > 0


@pytest.mark.slow
def test_neural_dead_unit_toy(tmp_path, data_cache):
    """Rows for every arm and seed; the certificate agrees with the data: a certified dead unit gives uniform
    attention; leaky_relu is never certified dead, alive_init never at init."""
    script = load_script("neural_dead_unit")
    common = ["--seeds", "0", "1", "2", "--steps", "2", "--hidden-size", "64", "--layers", "1", "--heads", "1",
              "--block-size", "32", "--vocab-size", "512", "--batch-size", "4", "--runs-dir", str(tmp_path / "runs"),
              "--cache-dir", data_cache]
    assert script.main([*common, "--arms", "relu", "alive_init", "--output", str(tmp_path / "first")]) == 0
    # an arm added later keeps the earlier rows; other settings are refused
    with pytest.raises(SystemExit, match=r"other settings: steps=2 \(here 3\)$"):
        script.main([*common[:5], "3", *common[6:], "--arms", "leaky_relu",
                     "--keep-rows-from", str(tmp_path / "first" / "results.json")])
    assert script.main([*common, "--arms", "leaky_relu", "--output", str(tmp_path / "results"),
                        "--keep-rows-from", str(tmp_path / "first" / "results.json")]) == 0
    rows = json.loads((tmp_path / "results" / "results.json").read_text())["rows"]
    assert {(r["arm"], r["seed"]) for r in rows} == {(a, s) for a in script.ARMS for s in (0, 1, 2)}
    for row in rows:
        for stage in ("init", "trained"):
            if row[f"{stage}_certificate"]:
                assert row[f"{stage}_uniform"], row
        assert row["arm"] != "leaky_relu" or not row["init_certificate"] and not row["trained_certificate"]
        assert row["arm"] != "alive_init" or not row["init_certificate"] and not row["init_uniform"]
    assert "| leaky_relu |" in (tmp_path / "results" / "results.md").read_text()


@pytest.mark.slow
def test_reproduce_neural_toy_image(tmp_path, data_cache):
    script = load_script("reproduce_neural")
    assert script.main([
        "--tasks", "image", "--image-steps", "2", "--hidden-size", "32", "--layers", "1", "--heads", "1",
        "--image-batch-size", "16", "--output", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"),
        "--cache-dir", data_cache]) == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    arms = {(r["arm"], r["seed"]) for r in results["runs"]}
    assert arms == {(arm, seed) for arm in ("dot", "neural-first") for seed in (0, 1, 2)}
    neural = [r for r in results["runs"] if r["arm"] == "neural-first"]
    assert all(r["variant_parameters"] > 0 and 0 <= r["first_layer_max_deviation_from_uniform"] <= 1 for r in neural)
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| image | neural-first |" in table and "seeds" in table
    assert (tmp_path / "results" / "cards" / "image-neural-first.md").exists()


@pytest.mark.slow
def test_reproduce_cdape_toy(tmp_path, data_cache, monkeypatch):
    """Every arm trains and is scored at every length; Kerple alone trains only the Kerple parameters on top of NoPE
    (its convolutions stay frozen); growth columns and one verdict per base arm are written. Two runs of some arms
    each merge into one table without training again; a run with other settings is refused."""
    script = load_script("reproduce_cdape")
    common = ["--steps", "2", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--train-length", "32",
              "--eval-lengths", "32", "64", "--eval-tokens", "256", "--batch-size", "4", "--vocab-size", "512",
              "--runs-dir", str(tmp_path / "runs"), "--cache-dir", data_cache]
    assert script.main([*common, "--arms", "rope", "rope+cdape", "nope", "nope+cdape",
                        "--output", str(tmp_path / "first")]) == 0
    assert script.main([*common, "--arms", "kerple", "kerple+cdape", "--output", str(tmp_path / "second")]) == 0
    earlier = [str(tmp_path / name / "results.json") for name in ("first", "second")]
    with pytest.raises(SystemExit, match=r"other settings: steps=2 \(here 3\)"):
        script.main([*common[:1], "3", *common[2:], "--keep-rows-from", *earlier, "--output", str(tmp_path / "x")])

    def no_training(*args, **kwargs):
        raise AssertionError("a kept (arm, seed) was trained again")

    monkeypatch.setattr(script, "train_arm", no_training)
    assert script.main([*common, "--keep-rows-from", *earlier, "--output", str(tmp_path / "results")]) == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [(a, s) for s in (0, 1, 2) for a in script.ARMS]
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {(arm, seed) for arm in script.ARMS for seed in (0, 1, 2)}
    assert all(set(r["perplexity"]) == {"32", "64"} and all(p > 1 for p in r["perplexity"].values())
               for r in results["runs"])
    kerple, nope = runs[("kerple", 0)], runs[("nope", 0)]
    assert kerple["trainable_parameters"] == nope["trainable_parameters"] + 2 * 2  # r1, r2 per head, 1 layer
    assert kerple["parameters"] == runs[("kerple+cdape", 0)]["parameters"]
    assert set(results["verdicts"]) == {"rope", "nope", "kerple"}
    assert all(v.startswith(("holds", "does not hold", "inconclusive")) for v in results["verdicts"].values())
    table = (tmp_path / "results" / "results.md").read_text()
    assert "growth 64/32" in table and "| kerple+cdape |" in table
    assert {f"{arm}.md" for arm in script.ARMS} == {p.name for p in (tmp_path / "results" / "cards").iterdir()}


@pytest.mark.slow
def test_reproduce_expressive_toy(tmp_path):
    """Both arms train at every level and seed through the harness (a model factory per arm); accuracy is scored on
    the held-out recurrence, one card per arm and level, the table has one line per level."""
    script = load_script("reproduce_expressive")
    assert script.main([
        "--levels", "1", "2", "--steps", "2", "--length", "12", "--train-sequences", "16", "--test-sequences", "8",
        "--batch-size", "8", "--hidden-size", "16", "--layers", "1", "--heads", "2",
        "--output", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]) == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    runs = {(r["arm"], r["level"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {(arm, level, seed) for arm in script.ARMS for level in (1, 2) for seed in (0, 1, 2)}
    assert all(0 <= r["accuracy"] <= 1 and r["seconds"] > 0 for r in results["runs"])
    # the factory is seeded: the same seed gives the same initial weights, so the same run twice agrees
    args = argparse.Namespace(steps=2, length=12, train_sequences=16, test_sequences=8, batch_size=8,
                              learning_rate=3e-3, hidden_size=16, layers=1, heads=2, runs_dir=str(tmp_path / "again"),
                              seeds=[1, 2, 3])
    again = script.train_arm("dot", 1, 0, args, tmp_path / "again")
    assert again["accuracy"] == runs[("dot", 1, 0)]["accuracy"]
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| 1 | 4 | 3 | 0.250 |" in table and "| 2 | 6 | 4 | 0.167 |" in table
    assert "AdamW lr 0.003 (beta2 0.999, weight decay 0.0" in table
    assert {p.name for p in (tmp_path / "results" / "cards").iterdir()} == {
        f"{arm}-L{level}.md" for arm in script.ARMS for level in (1, 2)}
    assert (tmp_path / "results" / "accuracy.png").stat().st_size > 0
