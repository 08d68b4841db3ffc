"""The engine choice (dispatch.py): first engine that applies wins, every option reaches the engine that computes it
correctly, and a path that does not apply says why once."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from hf_neural_attention import attention_interface, dispatch, triton_attention
from hf_neural_attention import chunked as chunked_engine
from hf_neural_attention.masks import split_attention_mask
from hf_neural_attention.registry import build_variant
from hf_neural_attention.runtime import fast_paths

B, H, D = 2, 2, 24
CHUNKED = dict(min_size=0, chunk_size=4, backend="chunked")
TRITON = dict(min_size=0, chunk_size=4, backend="triton")


@pytest.fixture(autouse=True)
def fresh_messages(monkeypatch):
    monkeypatch.setattr(dispatch, "_SAID", set())


def neural(**options):
    torch.manual_seed(1)
    variant = build_variant("neural", H, D, proj_dim=4, **({"hidden_dims": [4, 2]} | options))
    with torch.no_grad():
        for parameter in variant.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        for bias in variant.mlp_biases[:-1]:
            bias.add_(0.5)  # keep the ReLU units alive, so the MLP counts
    return variant


def run(variant, settings, mask_input=None, causal=True, weights=False):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 19, D, generator=generator).requires_grad_() for _ in range(3))
    mask = split_attention_mask(mask_input, 19, 19, causal, q.device)
    with fast_paths(True, **settings):
        output, returned = dispatch.attention(variant, q, k, v, mask, D**-0.5, 0.0, weights)
    grads = torch.autograd.grad(output, [q, k, v, *variant.parameters()], torch.ones_like(output))
    return output, grads, returned


def kernel_calls(monkeypatch) -> list:
    calls = []
    original = triton_attention.fused_attention
    monkeypatch.setattr(triton_attention, "fused_attention", lambda *a: calls.append(1) or original(*a))
    return calls


NEURAL_OPTIONS = [{}, {"activation": "leaky_relu"}, {"hidden_dims": [3]}, {"hidden_dims": [4, 3, 2]},
                  {"per_head": True}, {"combine": "add"}, {"init": "alive"}]


@pytest.mark.triton
@pytest.mark.parametrize("options", NEURAL_OPTIONS, ids=str)
def test_every_neural_option_reaches_an_engine_that_computes_it(options, monkeypatch, caplog):
    """Forced onto the kernels, each option gives the chunked engine's numbers; where the kernels do not cover it,
    the call says so once (and routing, say, leaky_relu into ReLU kernels would change the numbers)."""
    variant = neural(**options)
    calls = kernel_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        forced = run(variant, TRITON)
        run(variant, TRITON)
    chunked = run(variant, CHUNKED)
    torch.testing.assert_close(forced[0], chunked[0], rtol=0, atol=1e-5)
    for got, expected in zip(forced[1], chunked[1]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    said = [r.getMessage() for r in caplog.records if "fused kernels do not run" in r.getMessage()]
    if calls:
        assert not said
    else:
        assert len(said) == 1, said  # once, for two calls


@pytest.mark.triton
def test_an_additive_bias_leaves_the_kernels_and_says_so_once(monkeypatch, caplog):
    keep = torch.rand(B, 1, 19, 19, generator=torch.Generator().manual_seed(3)) < 0.8
    keep[..., -1] = True
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf")) + 0.25 * keep
    variant = build_variant("expressive", H, D)
    calls = kernel_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        forced = run(variant, TRITON, bias, causal=False)
        run(variant, TRITON, bias, causal=False)
    torch.testing.assert_close(forced[0], run(variant, CHUNKED, bias, causal=False)[0], rtol=0, atol=1e-5)
    said = [r.getMessage() for r in caplog.records if "additive bias" in r.getMessage()]
    assert calls or len(said) == 1, said


def test_engines_in_order_and_weights_only_from_the_plain_path(monkeypatch, caplog):
    variant = build_variant("expressive", H, D)
    chunked = []
    original = chunked_engine._forward_chunks
    monkeypatch.setattr(chunked_engine, "_forward_chunks", lambda *a: chunked.append(1) or original(*a))
    _, _, weights = run(variant, CHUNKED)
    assert weights is None and chunked == [1]
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        output, _, weights = run(variant, CHUNKED, weights=True)
        run(variant, CHUNKED, weights=True)
    assert weights is not None and weights.shape == (B, H, 19, 19) and chunked == [1]
    said = [r.getMessage() for r in caplog.records if "weights were requested" in r.getMessage()]
    assert len(said) == 1
    _, _, weights = run(variant, {"min_size": 1 << 20})  # a small map: the plain path, nothing said
    assert weights is not None and chunked == [1]
    assert len([r for r in caplog.records if "weights were requested" in r.getMessage()]) == 1


def test_a_dtype_the_fast_paths_refuse_is_said_once(caplog):
    variant = build_variant("expressive", H, D)
    q = torch.randn(B, H, 19, D)
    k, v = q.double(), q.double()
    mask = split_attention_mask(None, 19, 19, True, q.device)
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__), fast_paths(True, **CHUNKED):
        for _ in range(2):
            dispatch.attention(variant, q, k, v, mask, D**-0.5, 0.0)
    said = [r.getMessage() for r in caplog.records if "share one dtype" in r.getMessage()]
    assert len(said) == 1 and "torch.float32, torch.float64, torch.float64" in said[0]


def test_without_transformers_output_recorder_the_package_refuses_clearly(monkeypatch):
    """Weights requested through the recorder could not be seen; before, every call then took the plain path."""
    attention_interface._output_collector.cache_clear()
    monkeypatch.setitem(sys.modules, "transformers.utils.output_capturing", None)
    try:
        with pytest.raises(ImportError, match="output_capturing._active_collector"):
            attention_interface.attention_weights_requested({})
    finally:
        attention_interface._output_collector.cache_clear()
