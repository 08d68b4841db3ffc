"""Bad input gets a clear error naming the problem and the valid choices; a failed convert changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_neural_attention as hfna
from hf_neural_attention.injection import VARIANT_ATTRIBUTE
from conftest import tiny_gpt2, tiny_llama


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown attention variant 'flash'.*'dot', 'expressive', 'neural', 'cdape'"):
        hfna.convert(tiny_gpt2(), "flash")


@pytest.mark.parametrize("size", [2, 4, 0, -1])
def test_bad_kernel_size(size):
    with pytest.raises(ValueError, match="kernel_size"):
        hfna.convert(tiny_gpt2(), "cdape", kernel_size=size)


@pytest.mark.parametrize("proj_dim", [0, -3, 1.5])
def test_bad_proj_dim(proj_dim):
    with pytest.raises(ValueError, match="proj_dim must be an integer >= 1"):
        hfna.convert(tiny_gpt2(), "neural", proj_dim=proj_dim)


@pytest.mark.parametrize(
    "options,pattern",
    [
        ({"form": "cubic"}, r"form='cubic' is not valid; choose one of \['rational', 'square', 'softmax_square'\]"),
        ({"scale": "yes"}, "scale must be True or False"),
        ({"combine": "mul"}, r"combine='mul' is not valid; choose one of \['replace', 'add'\]"),
        ({"hidden_dims": []}, "hidden_dims must be a non-empty list"),
        ({"hidden_dims": [4, 0]}, "each entry of hidden_dims must be an integer >= 1"),
        ({"bias": "rope"}, r"bias='rope' is not valid; choose one of \['none', 'alibi', 'kerple'\]"),
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1"),
    ],
)
def test_bad_option_values(options, pattern):
    variant = {"form": "expressive", "scale": "expressive", "combine": "neural", "hidden_dims": "neural"}.get(
        next(iter(options)), "cdape"
    )
    with pytest.raises(ValueError, match=pattern):
        hfna.convert(tiny_gpt2(), variant, **options)


def test_unknown_option_names_valid_options():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['kernel'\] for attention variant 'cdape'; valid "
                                         r"options are \['kernel_size', 'hidden_size', 'bias', 'zero_init'\]"):
        hfna.convert(tiny_gpt2(), "cdape", kernel=3)
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['scale'\] for attention variant 'dot'"):
        hfna.convert(tiny_gpt2(), "dot", scale=True)


@pytest.mark.parametrize("layers", [[2], [0, 5], [-1]])
def test_layer_index_out_of_range(layers):
    with pytest.raises(ValueError, match=r"out of range: this model has 2 attention layers \(0..1\)"):
        hfna.convert(tiny_llama(), "cdape", layers=layers)


@pytest.mark.parametrize("layers", ["first", [], [0.5], 3])
def test_malformed_layers(layers):
    with pytest.raises(ValueError, match="layer"):
        hfna.convert(tiny_llama(), "cdape", layers=layers)


def test_model_without_attention_interface():
    class HandWritten(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 2)

    with pytest.raises(ValueError, match="no attention module that dispatches through Transformers' AttentionInterface"):
        hfna.convert(HandWritten(), "expressive")


def test_failed_convert_leaves_model_untouched():
    model = tiny_gpt2()
    before = model.config._attn_implementation
    with pytest.raises(ValueError):
        hfna.convert(model, "cdape", layers=[0, 1], kernel_size=4)
    assert model.config._attn_implementation == before
    assert not any(VARIANT_ATTRIBUTE in name for name, _ in model.named_modules())
    assert not hasattr(model.config, "attention_variant")


def test_converting_twice_is_refused():
    model = hfna.convert(tiny_gpt2(), "cdape")
    with pytest.raises(ValueError, match="already converted"):
        hfna.convert(model, "neural")


def test_unsupported_model_arguments_are_refused_not_dropped():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = nn.Module()
    module.attention_variant = hfna.ExpressiveAttention(2, 8)
    q = k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="does not support the 'softcap' argument"):
        ALL_ATTENTION_FUNCTIONS["expressive"](module, q, k, v, None, softcap=30.0)


def test_malformed_mask_shape():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = nn.Module()
    module.attention_variant = hfna.DotProductAttention(2, 8)
    q = k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"attention_mask must be 4D and broadcastable to \[batch, heads, 3, 3\]"):
        ALL_ATTENTION_FUNCTIONS["dot"](module, q, k, v, torch.ones(1, 3, dtype=torch.bool))
