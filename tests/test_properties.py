"""Property-based tests (hypothesis) of the mask machinery and every variant: random batch sizes, lengths, cache
splits, padding sides, fully masked rows, GQA ratios, dtypes and chunk sizes. Invariants: weights are >= 0, sum to 1
over visible keys (0 for a row with none, for the ratio variants) and are exactly 0 on masked keys; nothing is NaN;
a query never depends on keys it cannot see; the chunked path equals the plain path."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_neural_attention.masks import KeyMask, split_attention_mask
from hf_neural_attention.runtime import fast_paths
from conftest import RICH_OPTIONS
import hf_neural_attention as hfna

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VARIANT_NAMES = ["dot", "expressive", "neural", "cdape"]


@st.composite
def attention_problems(draw):
    """(variant module, q, k, v, boolean keep [B, 1, Lq, Lk], mask handed to the function)."""
    variant = draw(st.sampled_from(VARIANT_NAMES))
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    k_len = draw(st.integers(1, 12))
    q_len = draw(st.integers(1, k_len))  # q_len < k_len: a cache split (the queries are the last slots)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator, dtype=dtype)
    causal = draw(st.booleans())
    keep = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool)
    if causal:
        keep &= (torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None])[None, None]
    pads = draw(st.lists(st.integers(0, k_len), min_size=batch, max_size=batch))
    left = draw(st.booleans())
    for row, pad in enumerate(pads):
        if left:
            keep[row, :, :, :pad] = False
        else:
            keep[row, :, :, k_len - pad :] = False
    additive = draw(st.booleans())
    mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min) if additive else keep
    torch.manual_seed(seed)
    options = {**RICH_OPTIONS[variant], **({"zero_init": False} if variant == "cdape" else {})}
    module = hfna.build_variant(variant, heads, head_dim, **options).to(dtype)
    return variant, module, q, k, v, keep, mask, causal


def expand(keep: torch.Tensor, heads: int) -> torch.Tensor:
    return keep.expand(keep.shape[0], heads, *keep.shape[2:])


@PROPERTY_SETTINGS
@given(attention_problems())
def test_weights_are_a_distribution_over_visible_keys(problem):
    variant, module, q, k, v, keep, mask, causal = problem
    heads = q.shape[1]
    k_full = k.repeat_interleave(heads // k.shape[1], dim=1)
    key_mask = split_attention_mask(mask, q.shape[2], k.shape[2], causal, q.device)
    with torch.no_grad():
        weights = module.attention_weights(q, k_full, key_mask, q.shape[-1] ** -0.5)
    assert torch.isfinite(weights).all()
    assert (weights >= 0).all()
    visible = expand(keep, heads)
    has_visible = visible.any(dim=-1)
    assert (weights[~visible & has_visible[..., None]] == 0).all(), "a masked key got weight"
    sums = weights.sum(dim=-1)
    tolerance = 1e-5 if q.dtype == torch.float32 else 1e-12
    assert torch.allclose(sums[has_visible], torch.ones_like(sums[has_visible]), atol=tolerance)


@PROPERTY_SETTINGS
@given(attention_problems(), st.integers(1, 5))
def test_chunked_path_equals_plain_path_and_hidden_keys_do_not_matter(problem, chunk_size):
    variant, module, q, k, v, keep, mask, causal = problem
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from test_formulas import Holder

    function = ALL_ATTENTION_FUNCTIONS[variant]
    holder = Holder(module, is_causal=causal)
    with torch.no_grad(), fast_paths(False):
        plain, _ = function(holder, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    with torch.no_grad(), fast_paths(True, min_size=0, chunk_size=chunk_size):
        chunked, _ = function(holder, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    assert torch.isfinite(plain).all() and torch.isfinite(chunked).all()
    tolerance = dict(rtol=1e-4, atol=1e-5) if q.dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(chunked, plain, **tolerance)
    # Keys no query of a row can see (padding) may change freely without changing that row's visible outputs.
    hidden = ~keep.any(dim=2)  # [B, 1, Lk]
    if hidden.any() and variant != "cdape":  # cdape reads masked positions as zeros, so they already cannot matter
        k2, v2 = k.clone(), v.clone()
        k2.masked_fill_(hidden[..., None].expand_as(k2[:, :1]).expand_as(k2), 7.0)
        v2.masked_fill_(hidden[..., None].expand_as(v2[:, :1]).expand_as(v2), -7.0)
        with torch.no_grad(), fast_paths(False):
            changed, _ = function(holder, q, k2, v2, mask, scaling=q.shape[-1] ** -0.5)
        rows = keep.any(dim=-1)[:, 0]  # [B, Lq]: queries with some visible key
        torch.testing.assert_close(changed[rows], plain[rows], **tolerance)


@PROPERTY_SETTINGS
@given(st.integers(1, 9), st.integers(0, 9), st.booleans())
def test_split_mask_round_trips_boolean_and_additive_masks(q_len, extra, additive):
    k_len = q_len + extra
    generator = torch.Generator().manual_seed(q_len * 31 + extra)
    keep = torch.rand(2, 1, q_len, k_len, generator=generator) < 0.6
    bias = torch.randn(keep.shape, generator=generator).masked_fill(~keep, 0.0)
    mask = (torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min) + bias) if additive else keep
    split = split_attention_mask(mask, q_len, k_len, False, keep.device)
    assert isinstance(split, KeyMask) and torch.equal(split.keep, keep)
    if additive:
        torch.testing.assert_close(split.bias, bias) if bool(bias.any()) else None
    else:
        assert split.bias is None
