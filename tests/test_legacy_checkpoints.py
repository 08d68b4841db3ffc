"""Checkpoints saved before the package restructuring (tests/fixtures/legacy_checkpoints, saved at d9792a4) still
load and give the logits they gave when saved: with today's package imported, on both paths, and through their own
shipped code with trust_remote_code where the package cannot be imported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

import hf_neural_attention as hfna
from conftest import load_without_the_package

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoints"
CASES = {
    "gpt2-neural": (AutoModelForCausalLM, hfna.VariantGPT2LMHeadModel, "neural",
                    {"proj_dim": 4, "hidden_dims": [4, 2], "per_head": True, "combine": "add",
                     # options added since the fixture was saved load with their defaults, the old behaviour
                     "activation": "relu", "init": "reference"}),
    "llama-cdape": (AutoModelForCausalLM, hfna.VariantLlamaForCausalLM, "cdape",
                    {"kernel_size": 5, "hidden_size": 8, "bias": "kerple", "zero_init": False}),
    "vit-expressive": (AutoModelForImageClassification, hfna.VariantViTForImageClassification, "expressive",
                       {"form": "square", "scale": True}),
}


def stored(folder: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    expected = load_file(str(folder / "expected_outputs.safetensors"))
    return {name: t for name, t in expected.items() if name != "logits"}, expected["logits"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "chunked"])
def test_legacy_checkpoint_loads_with_todays_package(name, fast):
    auto_class, variant_class, variant, options = CASES[name]
    folder = FIXTURES / name
    model = auto_class.from_pretrained(folder)  # the package is imported: its own classes, not the shipped code
    assert type(model) is variant_class
    assert model.config.attention_variant == variant and model.config.attention_variant_options == options
    inputs, logits = stored(folder)
    settings = {"min_size": 0, "chunk_size": 3} if fast else {}
    with torch.no_grad(), hfna.fast_paths(fast, **settings):
        actual = model(**inputs).logits
    torch.testing.assert_close(actual, logits, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_legacy_checkpoints_load_through_their_own_code(tmp_path):
    jobs = []
    for name, (auto_class, _, _, _) in CASES.items():
        copy = tmp_path / name
        shutil.copytree(FIXTURES / name, copy)
        jobs.append([str(copy), auto_class.__name__])
    report = load_without_the_package(jobs, tmp_path)
    for name, (_, variant_class, variant, _) in CASES.items():
        entry = report[str(tmp_path / name)]
        assert entry["class"] == variant_class.__name__ and entry["module"].startswith("transformers_modules")
        assert entry["implementation"] == variant
        assert entry["max_diff"] <= 1e-5, (name, entry)
