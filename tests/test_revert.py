"""`revert` gives the stock model back exactly, and a converted model refuses a silent switch of implementation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2ForSequenceClassification

import hf_neural_attention as hfna
from conftest import ALL_BUILDERS, VOCAB, converted, tiny_gpt2
from hf_neural_attention.injection import FALLBACK_ATTRIBUTE, VARIANT_ATTRIBUTE


def inputs_for(arch: str) -> dict:
    generator = torch.Generator().manual_seed(5)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    return {"input_ids": torch.randint(1, VOCAB, (2, 9), generator=generator)}


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
@pytest.mark.parametrize("variant", ["neural", "cdape", "expressive"])
def test_revert_gives_the_stock_models_outputs_exactly(arch, variant, tmp_path):
    torch.manual_seed(0)
    stock = ALL_BUILDERS[arch]()
    stock_type, stock_implementation = type(stock), stock.config._attn_implementation
    with torch.no_grad():
        expected = stock(**inputs_for(arch)).logits
    model = converted(lambda: stock, variant, layers=[0])  # layer 1 keeps the stock implementation
    with torch.no_grad():
        assert not torch.equal(model(**inputs_for(arch)).logits, expected)
    hfna.revert(model)
    assert type(model) is stock_type and type(model.config) is stock_type.config_class
    assert model.config._attn_implementation == stock_implementation
    assert not any(VARIANT_ATTRIBUTE in name for name, _ in model.named_parameters())
    assert not any(hasattr(m, FALLBACK_ATTRIBUTE) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs_for(arch)).logits, expected)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "attention_variant" not in saved and "auto_map" not in saved and saved["model_type"] == arch


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
def test_revert_restores_eager_when_the_model_ran_eager(arch):
    """The implementation the model had before convert comes back, not always SDPA; the layer convert left alone
    kept eager meanwhile (so it matched the stock eager model's layer exactly)."""
    torch.manual_seed(0)
    stock = ALL_BUILDERS[arch]()
    stock.set_attn_implementation("eager")
    with torch.no_grad():
        expected = stock(**inputs_for(arch)).logits
    model = hfna.convert(stock, "cdape", layers=[0])
    untouched = [m for m in model.modules() if hasattr(m, FALLBACK_ATTRIBUTE)]
    assert untouched and all(getattr(m, FALLBACK_ATTRIBUTE) == "eager" for m in untouched)
    with torch.no_grad():  # zero-initialised cdape keeps the outputs: the eager fallback layer is exact too
        torch.testing.assert_close(model(**inputs_for(arch)).logits, expected, rtol=0, atol=1e-5)
    hfna.revert(model)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.equal(model(**inputs_for(arch)).logits, expected)


def test_revert_works_for_any_converted_head_and_refuses_an_unconverted_model():
    torch.manual_seed(0)
    stock = GPT2ForSequenceClassification(tiny_gpt2().config).eval()
    ids = inputs_for("gpt2")["input_ids"]
    with torch.no_grad():
        expected = stock(input_ids=ids).logits
    hfna.revert(hfna.convert(stock, "cdape", zero_init=False))
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="not converted"):
        hfna.revert(stock)


def test_a_converted_model_refuses_another_implementation_and_keeps_its_variant(tmp_path):
    model = converted(ALL_BUILDERS["llama"], "cdape")
    with pytest.raises(ValueError, match=r"runs attention variant 'cdape'.*hf_neural_attention.revert"):
        model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "cdape"
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "cdape"
    reloaded.set_attn_implementation("cdape")  # the same implementation is fine
