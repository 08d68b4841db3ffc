"""Model features that change the attention weights and that no variant implements are refused, never dropped:
Gemma 2's logit soft-capping and learned attention sinks at `convert` (before anything changes, with the option to
set), and each such argument (`softcap`, `position_bias`, `s_aux`, `sinks`) at every variant's attention function."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_neural_attention as hfna
from hf_neural_attention.attention_interface import UNSUPPORTED_KWARGS
from hf_neural_attention.injection import FALLBACK_ATTRIBUTE, VARIANT_ATTRIBUTE
from conftest import VOCAB
from test_formulas import Holder, make_module, random_inputs

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=32, head_dim=16)


def tiny_gemma2(**kwargs) -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(**TINY, sliding_window=4, **kwargs)).eval()


@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_stock_gemma2_soft_capping_is_refused_at_convert_naming_the_option(variant):
    assert Gemma2Config().attn_logit_softcapping == 50.0  # the stock value
    model = tiny_gemma2()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"attn_logit_softcapping=50\.0.*Set attn_logit_softcapping=None"):
        hfna.convert(model, variant)
    assert type(model) is Gemma2ForCausalLM and not hasattr(model.config, "attention_variant")  # unchanged
    assert not any(hasattr(module, VARIANT_ATTRIBUTE) for module in model.modules())
    assert model.state_dict().keys() == before.keys()
    ids = torch.randint(1, VOCAB, (1, 6))
    assert torch.isfinite(model(ids).logits).all()


def test_gemma2_without_soft_capping_converts_and_runs():
    model = hfna.convert(tiny_gemma2(attn_logit_softcapping=None), "cdape")
    ids = torch.randint(1, VOCAB, (1, 6))
    assert torch.isfinite(model(ids).logits).all()


def test_learned_attention_sinks_are_refused_at_convert():
    torch.manual_seed(0)
    config = GptOssConfig(**TINY, num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(config).eval()
    with pytest.raises(ValueError, match="learned attention sinks"):
        hfna.convert(model, "dot")
    assert type(model) is GptOssForCausalLM


@pytest.mark.parametrize("argument", UNSUPPORTED_KWARGS)
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_every_weight_changing_argument_is_refused_by_every_variant(variant, argument):
    assert set(UNSUPPORTED_KWARGS) == {"softcap", "position_bias", "s_aux", "sinks"}
    q, k, v, _ = random_inputs()
    module = Holder(make_module(variant, {}), is_causal=True)
    value = 30.0 if argument == "softcap" else torch.zeros(q.shape[1])
    with pytest.raises(ValueError, match=f"{variant!r} does not support the {argument!r} argument"):
        ALL_ATTENTION_FUNCTIONS[variant](module, q, k, v, None, scaling=0.25, **{argument: value})
    ALL_ATTENTION_FUNCTIONS[variant](module, q, k, v, None, scaling=0.25, **{argument: None})  # None: not used


def test_a_layer_left_on_its_stock_implementation_refuses_them_too():
    """Layers convert() leaves alone still run through the variant's function (falling back to SDPA or eager)."""
    q, k, v, _ = random_inputs(dtype=torch.float32)
    for fallback in ("sdpa", "eager"):
        module = nn.Module()
        setattr(module, FALLBACK_ATTRIBUTE, fallback)
        with pytest.raises(ValueError, match="does not support the 'softcap' argument"):
            ALL_ATTENTION_FUNCTIONS["neural"](module, q, k, v, None, scaling=0.25, softcap=50.0)
