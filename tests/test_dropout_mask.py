"""The position-keyed dropout mask (dropout_mask.py): the hash against a uint32 re-statement, its statistics, and the
property every path relies on: any block of rows and keys is the same block of the whole map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hf_neural_attention.dropout_mask import (
    dropout_keep, dropout_scale, dropout_streams, keep_threshold, mix32,
)


def mix_reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x21F0AAAD)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x735A2D97)
        x ^= x >> np.uint32(15)
    return x


def keep_reference(seed: int, batch: int, heads: int, q_len: int, k_len: int, p: float) -> np.ndarray:
    lo, hi = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    base = mix_reference(lo ^ mix_reference(np.array(hi)))
    streams = mix_reference(base ^ np.arange(batch * heads, dtype=np.uint32)).reshape(batch, heads)
    row_keys = mix_reference(streams[:, :, None] ^ np.arange(q_len, dtype=np.uint32))
    hashed = mix_reference(row_keys[..., None] ^ np.arange(k_len, dtype=np.uint32))
    return hashed.astype(np.uint64) >= keep_threshold(p)


def test_mix32_equals_uint32_restatement():
    values = torch.randint(-(2**31), 2**31, (4099,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    got = mix32(values.to(torch.int32)).numpy().view(np.uint32)
    assert np.array_equal(got, mix_reference(values.numpy().astype(np.int32).view(np.uint32)))


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 12345, 2**62 - 1])
def test_keep_equals_uint32_restatement(seed):
    streams = dropout_streams(torch.tensor(seed), 2, 3)
    got = dropout_keep(streams, 0, 17, 33, 0.3).numpy()
    assert np.array_equal(got, keep_reference(seed, 2, 3, 17, 33, 0.3))


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 40), rows=st.integers(1, 24), key_end=st.integers(1, 64))
def test_any_block_is_the_same_block_of_the_whole_map(start, rows, key_end):
    streams = dropout_streams(torch.tensor(2026), 2, 2)
    whole = dropout_keep(streams, 0, 64, 64, 0.2)
    end = min(64, start + rows)
    assert torch.equal(dropout_keep(streams, start, end, key_end, 0.2), whole[:, :, start:end, :key_end])


def test_keep_rate_and_independence():
    p = 0.1
    keep = dropout_keep(dropout_streams(torch.tensor(7), 2, 4), 0, 512, 512, p).double()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    both = (keep[..., :, 1:] * keep[..., :, :-1]).mean().item()  # neighbours along keys
    assert abs(both - (1 - p) ** 2) < 0.005
    both = (keep[..., 1:, :] * keep[..., :-1, :]).mean().item()  # neighbours along queries
    assert abs(both - (1 - p) ** 2) < 0.005


def test_streams_differ_for_near_seeds_heads_and_batches():
    masks = [dropout_keep(dropout_streams(torch.tensor(seed), 2, 2), 0, 32, 32, 0.5) for seed in (10, 11)]
    assert not torch.equal(masks[0], masks[1])
    first = masks[0]
    assert not torch.equal(first[0, 0], first[0, 1]) and not torch.equal(first[0, 0], first[1, 0])
    # the old kernels' seed + b*H + h made (seed 11, head 0) repeat (seed 10, head 1); the hash does not
    assert not torch.equal(masks[1][0, 0], first[0, 1])


def test_scale_values_and_extremes():
    streams = dropout_streams(torch.tensor(3), 1, 1)
    scale = dropout_scale(streams, 0, 8, 8, 0.25)
    assert set(scale.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.equal(dropout_scale(streams, 0, 8, 8, 1.0), torch.zeros(1, 1, 8, 8))
    assert dropout_keep(streams, 0, 8, 8, 0.0).all()
