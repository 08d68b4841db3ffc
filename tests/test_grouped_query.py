"""Grouped-query attention (Llama-family models with fewer key/value heads than query heads): a one-query decoding
step reads the key/value cache as it is, never copied per query head, with the same numbers as the repeated heads:
rules that treat heads alike fold each kv head's query heads into rows of one map; the others (per-head neural,
cdape, whose convolution mixes heads) take q.k and the output through grouped products on the plain path."""

from __future__ import annotations

import pytest
import torch

from hf_neural_attention import dispatch
from hf_neural_attention.masks import split_attention_mask
from hf_neural_attention.registry import build_variant

CASES = [("dot", {}, True), ("expressive", {"form": "softmax_square", "scale": True}, True),
         ("neural", {"proj_dim": 4, "hidden_dims": [4, 2]}, True), ("neural", {"per_head": True}, False),
         ("cdape", {"bias": "kerple"}, False)]


@pytest.mark.parametrize("name,options,folds", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_a_decoding_step_reads_the_cache_without_repeating_it(name, options, folds, padded, monkeypatch):
    torch.manual_seed(0)
    variant = build_variant(name, 8, 16, **options).double()
    with torch.no_grad():
        for parameter in variant.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(3, 8, 1, 16, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 40, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    keep = None
    if padded:  # the mask of a left-padded decoding step: [B, 1, 1, Lk]
        keep = torch.ones(3, 1, 1, 40, dtype=torch.bool)
        keep[0, ..., :7] = False
    mask = split_attention_mask(keep, 1, 40, True, q.device)
    copies, folded = [], []
    original, original_fold = dispatch.repeat_kv, dispatch.groups_fold_into_rows
    monkeypatch.setattr(dispatch, "repeat_kv", lambda t, n: (copies.append(n) if n > 1 else None) or original(t, n))
    monkeypatch.setattr(dispatch, "groups_fold_into_rows", lambda *a: folded.append(original_fold(*a)) or folded[-1])
    with torch.no_grad():
        output, _ = dispatch.attention(variant, q, k, v, mask, 16**-0.5, 0.0)
        expected, _ = dispatch.attention(variant, q, original(k, 4), original(v, 4), mask, 16**-0.5, 0.0)
    assert not copies
    assert folded[0] == folds
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("name,options", [("expressive", {}), ("neural", {"proj_dim": 4, "hidden_dims": [4, 2]}),
                                          ("neural", {"per_head": True, "combine": "add"})], ids=str)
def test_the_kernels_get_the_grouped_keys_and_values_as_they_are(name, options, monkeypatch):
    """The kernels index kv head h // group themselves: dispatch hands them k and v unrepeated (a training-shaped
    call, so nothing folds), and the numbers equal the chunked engine's on repeated heads."""
    from hf_neural_attention.runtime import fast_paths

    torch.manual_seed(0)
    variant = build_variant(name, 4, 16, **options)
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 19, 16, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 2, 19, 16, generator=generator, requires_grad=True) for _ in range(2))
    mask = split_attention_mask(None, 19, 19, True, q.device)
    copies = []
    original = dispatch.repeat_kv
    monkeypatch.setattr(dispatch, "repeat_kv", lambda t, n: (copies.append(n) if n > 1 else None) or original(t, n))
    results = []
    for backend in ("triton", "chunked"):
        with fast_paths(True, min_size=0, chunk_size=4, backend=backend):
            output, _ = dispatch.attention(variant, q, k, v, mask, 16**-0.5, 0.0)
        results.append((output, *torch.autograd.grad(output.sum(), [q, k, v])))
        if backend == "triton":
            assert not copies, "the kernels got repeated keys or values"
    assert copies == [2, 2], "the chunked engine repeats them"
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,options", [("dot", {}), ("expressive", {}),
                                          ("neural", {"per_head": True, "combine": "add"}),
                                          ("cdape", {"bias": "alibi"})], ids=str)
def test_the_plain_path_takes_grouped_keys_with_the_gradients_of_repeated_ones(name, options):
    """A training-shaped call on the plain path (several queries, gradients) reads grouped keys and values through
    grouped products: outputs and gradients equal those of keys and values repeated per query head."""
    from hf_neural_attention.runtime import fast_paths

    torch.manual_seed(0)
    variant = build_variant(name, 8, 16, **options).double()
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 6, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 6, 16, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = split_attention_mask(None, 6, 6, True, q.device)
    grad_output = torch.randn(2, 8, 6, 16, generator=generator, dtype=torch.float64)
    results = []
    for repeat in (False, True):
        keys, values = (dispatch.repeat_kv(k, 4), dispatch.repeat_kv(v, 4)) if repeat else (k, v)
        with fast_paths(False):
            output, _ = dispatch.attention(variant, q, keys, values, mask, 16**-0.5, 0.0)
        results.append((output, *torch.autograd.grad(output, (q, k, v), grad_output)))
    for grouped, repeated in zip(*results):
        torch.testing.assert_close(grouped, repeated, rtol=1e-12, atol=1e-12)
