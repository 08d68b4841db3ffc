"""Sliding-window attention (Mistral, Qwen2, Gemma 2/3 sliding layers): every variant applies the band, on the plain
and chunked paths and with the KV cache; on the dot variant it equals the stock model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_neural_attention as hfna
from conftest import RICH_OPTIONS, VOCAB, perturb_added_parameters
from test_formulas import D, Holder, make_module, random_inputs

WINDOW = 3
NO_BAND = 64  # a window as long as the positions: no band at all
COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
              vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
# Each architecture's way of asking for sliding layers; Qwen2 and Gemma 2/3 mix sliding and full layers.
CONFIGS = {
    "mistral": lambda window: MistralConfig(**COMMON, sliding_window=window),
    "qwen2": lambda window: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=window, max_window_layers=0,
                                        layer_types=["sliding_attention", "full_attention"]),
    # Gemma 2's stock attn_logit_softcapping (50.0) is refused by convert: no variant implements soft-capping.
    "gemma2": lambda window: Gemma2Config(**COMMON, head_dim=16, sliding_window=window, attn_logit_softcapping=None,
                                          layer_types=["sliding_attention", "full_attention"]),
    "gemma3": lambda window: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=window,
                                              layer_types=["sliding_attention", "full_attention"]),
}
MODELS = {"mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM, "gemma2": Gemma2ForCausalLM,
          "gemma3": Gemma3ForCausalLM}


def tiny_sliding(arch: str = "mistral", window: int = WINDOW):
    torch.manual_seed(0)
    model = MODELS[arch](CONFIGS[arch](window)).eval()
    model.set_attn_implementation("eager")
    return model


def tiny_mistral(window: int | None = WINDOW) -> MistralForCausalLM:
    return tiny_sliding("mistral", NO_BAND if window is None else window)


def padded_batch():
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # left padding
    return ids, attention_mask


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_dot_variant_equals_the_stock_sliding_window_model(arch):
    stock = tiny_sliding(arch)
    ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = stock(ids, attention_mask=attention_mask).logits
        unbanded = tiny_sliding(arch, window=NO_BAND)
        unbanded.load_state_dict(stock.state_dict())
        assert (unbanded(ids, attention_mask=attention_mask).logits - expected).abs().max() > 1e-2  # the band matters
        model = hfna.convert(copy.deepcopy(stock), "dot")
        actual = model(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1], **greedy), stock.generate(ids[:1], **greedy))


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("variant", ["expressive", "neural", "cdape"])
def test_every_variant_bands_with_the_cache_and_on_the_chunked_path(arch, variant):
    model = hfna.convert(tiny_sliding(arch), variant, layers="all", **RICH_OPTIONS[variant])
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
