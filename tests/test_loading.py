"""The loading policy of the variant model classes (loading.py) as the small functions it is made of, and that a model
checks its variant's options once per way in (convert, a config, a model built from a config), not once per layer."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

import hf_neural_attention as hfna
from hf_neural_attention.loading import head_weights, is_variant_weight, lost_variant_weights, retrofit_kwargs
from hf_neural_attention.variant import AttentionVariant
from conftest import tiny_gpt2

NAMES = ["model.layers.0.self_attn", "model.layers.1.self_attn", "model.layers.2.self_attn"]


def test_a_retrofit_to_another_variant_starts_from_its_own_default_layers():
    stored = {"attention_variant": "dot", "attention_variant_layers": [0, 1, 2]}
    assert retrofit_kwargs(stored, {"attention_variant": "neural"}) == {
        "attention_variant": "neural", "attention_variant_layers": None}
    for kept in ({"attention_variant": "dot"},  # the same variant keeps the checkpoint's layers
                 {"attention_variant": "neural", "attention_variant_layers": [1]},  # named layers are kept
                 {"attention_variant": "neural", "config": object()},  # so is a whole config
                 {"revision": "main"}):  # no variant asked for
        assert retrofit_kwargs(stored, kept) == kept
    assert retrofit_kwargs({}, {"attention_variant": "cdape"})["attention_variant_layers"] is None  # a stock one


def test_a_base_model_ignores_only_the_weights_under_none_of_its_modules():
    unexpected = ["lm_head.weight", "score.weight", "layers.0.self_attn.attention_variant.conv_in.weight"]
    assert head_weights(unexpected, ["embed_tokens", "layers", "norm"]) == ["lm_head.weight", "score.weight"]
    assert head_weights([], ["layers"]) == []


def test_variant_weights_are_told_apart_from_stock_ones():
    assert is_variant_weight("model.layers.0.self_attn.attention_variant.conv_in.weight")
    assert is_variant_weight("attention_variant.w")  # at the top of a bare attention module
    assert not is_variant_weight("model.layers.0.self_attn.q_proj.weight")
    assert not is_variant_weight("model.my_attention_variant.weight")


def test_missing_weights_of_a_layer_the_checkpoint_says_holds_the_variant_are_lost():
    missing = {"model.layers.1.self_attn.attention_variant.conv_in.weight",
               "model.layers.2.self_attn.attention_variant.conv_in.weight"}
    stored = {"attention_variant": "cdape", "attention_variant_layers": [0, 1]}
    assert lost_variant_weights(stored, "cdape", NAMES, missing) == [
        "model.layers.1.self_attn.attention_variant.conv_in.weight"]  # layer 2 is a retrofit
    assert lost_variant_weights({**stored, "attention_variant_layers": None}, "cdape", NAMES, missing) == sorted(
        missing)  # None: every layer
    assert lost_variant_weights(stored, "neural", NAMES, missing) == []  # another variant: a retrofit
    assert lost_variant_weights({}, "cdape", NAMES, missing) == []  # a stock checkpoint


@pytest.fixture
def checks(monkeypatch) -> list[str]:
    calls = []
    original = AttentionVariant.check_options.__func__
    monkeypatch.setattr(AttentionVariant, "check_options",
                        classmethod(lambda cls, options: calls.append(cls.name) or original(cls, options)))
    return calls


def test_options_are_checked_once_per_way_in(checks, tmp_path):
    model = hfna.convert(tiny_gpt2(), "cdape", layers="all", kernel_size=5)  # two layers
    assert checks == ["cdape"]
    checks.clear()
    config = hfna.VariantGPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=50, attention_variant="cdape",
                                    attention_variant_layers="all")
    assert checks == ["cdape"]  # the config checks its fields when it is created
    checks.clear()
    hfna.VariantGPT2LMHeadModel(config)
    assert checks == []  # the model builds from what the config checked
    config.attention_variant_options = {"kernel_size": 4}  # an assignment the config does not check
    with pytest.raises(ValueError, match="kernel_size"):
        hfna.VariantGPT2LMHeadModel(config)  # the model checks fields changed since the config checked them
    assert checks == ["cdape"]
    model.save_pretrained(tmp_path)
    assert "_checked" not in (tmp_path / "config.json").read_text()
    checks.clear()
    hfna.VariantGPT2LMHeadModel.from_pretrained(tmp_path)
    assert checks == ["cdape"]  # the config read from config.json; the model builds from what it checked
    checks.clear()
    AutoModelForCausalLM.from_pretrained(tmp_path)
    assert checks == ["cdape"]
    checks.clear()
    hfna.CDAPEAttention(4, 8, kernel_size=5)
    assert checks == ["cdape"]  # a variant built directly checks its own
