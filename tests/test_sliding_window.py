"""Sliding-window attention (Mistral, Qwen2, Gemma 2/3 sliding layers): every variant applies the band, on the plain
and chunked paths and with the KV cache; on the dot variant it equals the stock model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_neural_attention as hfna
from conftest import RICH_OPTIONS, VOCAB, perturb_added_parameters
from test_formulas import D, Holder, make_module, random_inputs

WINDOW = 3


def tiny_mistral(window: int | None = WINDOW) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=VOCAB, sliding_window=window, max_position_embeddings=64,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = MistralForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    return model


def padded_batch():
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # left padding
    return ids, attention_mask


def test_dot_variant_equals_the_stock_sliding_window_model():
    stock = tiny_mistral()
    ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = stock(ids, attention_mask=attention_mask).logits
        unbanded = tiny_mistral(window=None)
        unbanded.load_state_dict(stock.state_dict())
        assert (unbanded(ids, attention_mask=attention_mask).logits - expected).abs().max() > 1e-2  # the band matters
        model = hfna.convert(copy.deepcopy(stock), "dot")
        actual = model(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1], **greedy), stock.generate(ids[:1], **greedy))


@pytest.mark.parametrize("variant", ["expressive", "neural", "cdape"])
def test_every_variant_bands_with_the_cache_and_on_the_chunked_path(variant):
    model = hfna.convert(tiny_mistral(), variant, layers="all", **RICH_OPTIONS[variant])
    perturb_added_parameters(model)
    ids, _ = padded_batch()
    ids = ids[:1]
    with torch.no_grad(), hfna.fast_paths(False):
        full = model(ids).logits
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
    with torch.no_grad(), hfna.fast_paths(True, min_size=0, chunk_size=5):
        chunked = model(ids).logits
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["dot", "expressive", "neural", "cdape"])
def test_the_band_is_applied_even_when_the_mask_is_not_banded(variant):
    """A plain causal mask (or none) plus sliding_window gives what the banded mask gives."""
    q, k, v, _ = random_inputs(q_len=7, k_len=7)
    module = make_module(variant, {} if variant == "dot" else RICH_OPTIONS[variant])
    rows, cols = torch.arange(7)[:, None], torch.arange(7)[None, :]
    banded = ((cols <= rows) & (rows - cols < WINDOW))[None, None]
    function = ALL_ATTENTION_FUNCTIONS[variant]
    with torch.no_grad():
        expected, _ = function(Holder(module, is_causal=True), q, k, v, banded, scaling=D**-0.5)
        for mask in (None, (cols <= rows)[None, None]):
            actual, _ = function(Holder(module, is_causal=True), q, k, v, mask, scaling=D**-0.5,
                                 sliding_window=WINDOW)
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
            function(Holder(module, is_causal=True), q, k, v, None, scaling=D**-0.5, sliding_window=0)


def test_a_stock_mistral_config_converts():
    config = MistralConfig()
    assert config.sliding_window == 4096
    tiny = MistralConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=VOCAB, sliding_window=config.sliding_window)
    model = hfna.convert(MistralForCausalLM(tiny), "cdape")
    ids = torch.randint(1, VOCAB, (1, 8))
    assert torch.isfinite(model(ids).logits).all()
