"""`make demo` (scripts/demo.py) leaves the clone clean: by default it writes to outputs/demo, which git ignores,
and never touches the committed reference run in results/demo; its figure keeps overlapping curves readable."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_neural_attention.experiments import report

from conftest import load_repo_file

REPO = Path(__file__).resolve().parents[1]


def load_demo():
    return load_repo_file("scripts/demo.py", "demo_script")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def curve(shift: float) -> dict:
    steps = list(range(1, 41))
    return {"train_steps": steps, "train_loss": [8.0 - 0.05 * s + shift for s in steps],
            "eval_steps": [10, 20, 30, 40], "eval_loss": [7.5 + shift, 7.0 + shift, 6.6 + shift, 6.3 + shift]}


def test_default_output_is_ignored_by_git_and_is_not_the_reference_run():
    demo = load_demo()
    assert demo.DEFAULT_OUTPUT.resolve() != (REPO / "results" / "demo").resolve()
    assert (REPO / "results" / "demo") not in demo.DEFAULT_OUTPUT.resolve().parents
    for path in (demo.DEFAULT_OUTPUT / "summary.md", demo.DEFAULT_OUTPUT / "dot" / "model" / "config.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
        assert ignored.returncode == 0, f"{path} is not ignored by git"


def test_a_run_with_default_arguments_writes_only_to_the_default_output(tmp_path, monkeypatch):
    demo = load_demo()
    reference = digest(REPO / "results" / "demo")
    monkeypatch.setattr(demo, "DEFAULT_OUTPUT", tmp_path / "demo")
    trained = []
    real_run = subprocess.run

    def fake_training(command, *args, **kwargs):  # what scripts/train.py leaves behind, without training
        if "--attention_variant" not in command:  # anything else (matplotlib's font probes) runs as it is
            return real_run(command, *args, **kwargs)
        variant = command[command.index("--attention_variant") + 1]
        run_dir = Path(command[command.index("--output_dir") + 1])
        run_dir.mkdir(parents=True)
        trained.append(variant)
        index = len(trained)
        (run_dir / "results.json").write_text(json.dumps({
            "architecture": "gpt2", "attention_variant": variant, "parameters": 1000 + index,
            "variant_parameters": index, "dataset": "stdlib-prose", "steps": 40, "seed": 42,
            "arguments": {"data": {"block_size": 128}}, "validation_perplexity": 400.0 + index,
            "test_perplexity": 390.0 + index, "train_tokens_per_second": 1000.0, "train_memory_peak_mib": None,
            "train_seconds": 10.0, "loss_curve": curve(0.001 * index)}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(demo.subprocess, "run", fake_training)
    monkeypatch.setattr(sys, "argv", ["demo.py"])
    assert demo.main() == 0
    assert trained == ["dot", "expressive", "neural", "cdape"]
    written = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert written == ["cdape", "dot", "expressive", "loss_curves.png", "neural", "summary.json", "summary.md"]
    assert digest(REPO / "results" / "demo") == reference


def test_overlapping_curves_get_distinct_styles_and_a_difference_panel(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda figure, path, **kwargs: figures.append(figure))
    curves = {name: curve(0.001 * index) for index, name in enumerate(["dot", "expressive", "neural", "cdape"])}
    report.plot_loss_curves(curves, tmp_path / "curves.png", "overlap", reference="dot")
    (figure,) = figures
    top, below = figure.axes
    train_lines = [line for line in top.get_lines() if line.get_label().endswith(" train")]
    assert len({(line.get_linestyle(), line.get_marker()) for line in train_lines}) == 4
    differences = {line.get_label(): line.get_ydata() for line in below.get_lines()}
    assert differences["expressive train"] == pytest.approx([0.001] * 40)
    assert differences["cdape validation"] == pytest.approx([0.003] * 4)
    assert "dot train" not in differences
    report.pyplot().close(figure)
    report.plot_loss_curves({"dot": curve(0.0)}, tmp_path / "one.png", "one run", reference="dot")
    assert len(figures[1].axes) == 1
