"""Compiled FlexAttention for inference (FAST_PATHS.flex_inference): every expressive form with and without scale,
and different masks of one shape; each test proves FlexAttention actually ran (no silent fallback)."""

from __future__ import annotations

import pytest
import torch

import hf_neural_attention as hfna
from hf_neural_attention import flex
from hf_neural_attention import chunked
from hf_neural_attention.runtime import fast_paths
from test_fast_paths import build_mask, call
from test_formulas import D, random_inputs

pytestmark = pytest.mark.slow  # each test compiles FlexAttention (torch.compile)


@pytest.fixture
def flex_calls(monkeypatch):
    """Counts compiled FlexAttention calls and makes any fallback to the chunked engine an error."""
    calls = []
    compiled = flex._compiled_flex_attention()

    def counting(*args, **kwargs):
        calls.append(1)
        return compiled(*args, **kwargs)

    monkeypatch.setattr(flex, "_compiled_flex_attention", lambda: counting)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the chunked engine ran instead of FlexAttention")

    monkeypatch.setattr(chunked, "_forward_chunks", no_fallback)
    return calls


@pytest.mark.parametrize("form", ["rational", "square", "softmax_square"])
@pytest.mark.parametrize("scale", [False, True])
def test_flex_inference_every_expressive_form(form, scale, flex_calls):
    q, k, v, keep = random_inputs(dtype=torch.float32, q_len=9, k_len=11, scale=0.3)
    mask, _ = build_mask(keep, "bool", torch.float32)
    module = hfna.build_variant("expressive", 4, D, form=form, scale=scale)
    with torch.no_grad():
        with fast_paths(False):
            expected, _ = call("expressive", module, q, k, v, mask)
        with fast_paths(True, min_size=0, flex_inference=True):
            output, weights = call("expressive", module, q, k, v, mask)
    assert weights is None and len(flex_calls) == 1, "FlexAttention did not run"
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["dot", "expressive"])
def test_flex_same_shape_different_masks(variant, flex_calls):
    """The block mask is cached by the mask tensor's identity, never by shape alone."""
    q, k, v, keep = random_inputs(dtype=torch.float32, q_len=9, k_len=11, scale=0.3)
    other = keep.clone()
    other[:, :, :, :5] = ~other[:, :, :, :5]
    other[..., -1] = True
    module = hfna.build_variant(variant, 4, D)
    for pattern in (keep, other, keep.clone()):
        with torch.no_grad():
            with fast_paths(False):
                expected, _ = call(variant, module, q, k, v, pattern)
            with fast_paths(True, min_size=0, flex_inference=True):
                output, _ = call(variant, module, q, k, v, pattern)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    assert len(flex_calls) == 3


def test_flex_an_edited_mask_buffer_gets_a_new_block_mask(flex_calls):
    """A reused mask buffer edited in place between calls (its version counter moves) is read again."""
    q, k, v, keep = random_inputs(dtype=torch.float32, q_len=9, k_len=11, scale=0.3)
    buffer = keep.clone()
    module = hfna.build_variant("expressive", 4, D)
    for edit in (None, slice(0, 5)):
        if edit is not None:
            buffer[:, :, :, edit] = ~buffer[:, :, :, edit]
            buffer[..., -1] = True
        with torch.no_grad():
            with fast_paths(False):
                expected, _ = call("expressive", module, q, k, v, buffer)
            with fast_paths(True, min_size=0, flex_inference=True):
                output, _ = call("expressive", module, q, k, v, buffer)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    assert len(flex_calls) == 2
