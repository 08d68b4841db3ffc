"""The fused Triton kernels (expressive, neural) run through Triton's interpreter on this CPU (conftest sets
TRITON_INTERPRET=1) and match the chunked path and the float64 formulas: outputs, and gradients of q, k, v and the
neural MLP's weights, over block-boundary shapes, masks with fully masked rows, cache-shaped calls, grouped-query
heads, dropout (dropout_mask's position-keyed mask), bfloat16, a whole model, and the rule that selects them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_neural_attention as hfna
from hf_neural_attention import dispatch, triton_attention, triton_kernels
from hf_neural_attention.masks import causal_keep, split_attention_mask
from hf_neural_attention.registry import build_variant
from hf_neural_attention.runtime import fast_paths
from hf_neural_attention.triton_attention import Tiles
from conftest import ALL_BUILDERS, VOCAB, converted
from test_formulas import Holder

assert triton_kernels.interpreted(), "conftest must set TRITON_INTERPRET=1 before triton is imported"
pytestmark = pytest.mark.triton

B, H, D = 2, 2, 24  # a head dim that is no power of two (padded to 32 inside the kernels)
SHAPES = [(19, 19), (5, 21), (16, 33)]  # odd lengths, a cache-shaped call (Lq < Lk), exact and ragged blocks
CHUNKED = dict(min_size=0, chunk_size=4, backend="chunked")
TRITON = dict(min_size=0, chunk_size=4, backend="triton")  # chunk_size: where a call falls back


def inputs(q_len, k_len, dtype=torch.float32, fully_masked_row=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=generator) for n in (q_len, k_len, k_len))
    keep = torch.rand(B, 1, q_len, k_len, generator=generator) < 0.7
    keep[..., -1] = True
    if fully_masked_row:
        keep[1, :, 0] = False  # a padding query: no visible key
    return q.to(dtype), k.to(dtype), v.to(dtype), keep


def expressive_reference(q, k, keep, module):
    """float64 weights: f(s) / sum f(s) over visible keys, s = q.k (/ sqrt(d) with scale)."""
    s = q @ k.transpose(-1, -2) * (D**-0.5 if module.scale else 1.0)
    f = {"rational": s**2 / (1 + s**2), "square": s**2, "softmax_square": torch.exp(s**2)}[module.form]
    f = f.masked_fill(~keep, 0.0)
    return (f / f.sum(-1, keepdim=True)).nan_to_num(0.0)


def neural_reference(q, k, keep, module):
    """float64 weights in the reference code's layout: down-project, repeat + cat the pair, MLP, softmax (a fully
    masked row: uniform, as eager attention gives it)."""
    heads = []
    for h in range(q.shape[1]):
        g = h if module.per_head else 0
        q_small = q[:, h] @ module.query_down_weight[g].T + module.query_down_bias[g]  # [B, Lq, d']
        k_small = k[:, h] @ module.key_down_weight[g].T + module.key_down_bias[g]  # [B, Lk, d']
        x = torch.cat([q_small[:, :, None, :].expand(-1, -1, k.shape[2], -1),
                       k_small[:, None, :, :].expand(-1, q.shape[2], -1, -1)], dim=-1)  # [B, Lq, Lk, 2d']
        for index, (w, b) in enumerate(zip(module.mlp_weights, module.mlp_biases)):
            x = x @ w[g].T + b[g]
            x = torch.relu(x) if index < len(module.mlp_weights) - 1 else x
        heads.append(x[..., 0])
    scores = torch.stack(heads, dim=1)
    if module.combine == "add":
        scores = scores + q @ k.transpose(-1, -2) * D**-0.5
    scores = scores.masked_fill(~keep, torch.finfo(torch.float64).min)
    return torch.softmax(scores, dim=-1)


def run(variant, q, k, v, keep, settings, dropout=0.0, seed=3, causal=False):
    """Output and gradients (q, k, v, then the variant's parameters) under the given fast-path settings."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    mask = split_attention_mask(keep, q.shape[2], k.shape[2], causal, q.device)
    torch.manual_seed(seed)  # the dropout seed is drawn from the global generator
    with fast_paths(True, **settings):
        output, weights = dispatch.attention(variant, q, k, v, mask, D**-0.5, dropout)
    assert weights is None
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    grads = torch.autograd.grad(output, [q, k, v, *variant.parameters()], grad_output)
    return output, grads


def assert_same(triton_result, chunked_result, output_atol=1e-5, grad_atol=1e-4):
    torch.testing.assert_close(triton_result[0], chunked_result[0], rtol=0, atol=output_atol)
    for index, (fused, chunked) in enumerate(zip(triton_result[1], chunked_result[1])):
        torch.testing.assert_close(fused, chunked, rtol=0, atol=grad_atol, msg=f"gradient {index}")


def neural_variant(options, seed=0):
    torch.manual_seed(seed)
    variant = build_variant("neural", H, D, **options)
    with torch.no_grad():
        for parameter in variant.parameters():  # every unit alive and every weight non-zero
            parameter.normal_(0.0, 0.5)
    return variant


@pytest.mark.parametrize("form", ["rational", "square", "softmax_square"])
@pytest.mark.parametrize("q_len,k_len", SHAPES)
def test_expressive_kernels_match_chunked_path_and_formula(form, q_len, k_len):
    variant = build_variant("expressive", H, D, form=form, scale=form != "square")
    q, k, v, keep = inputs(q_len, k_len)
    fused = run(variant, q, k, v, keep, TRITON)
    assert_same(fused, run(variant, q, k, v, keep, CHUNKED))
    weights = expressive_reference(q.double(), k.double(), keep, variant)
    torch.testing.assert_close(fused[0].double(), weights @ v.double(), rtol=0, atol=1e-5)
    assert fused[0][1, :, 0].abs().max() == 0  # a row with no visible key gets zero weights, never NaN


NEURAL_OPTIONS = [{}, {"combine": "add", "per_head": True}, {"proj_dim": 4, "hidden_dims": [4, 3]}]


@pytest.mark.parametrize("options", NEURAL_OPTIONS, ids=["default", "add-per-head", "wider"])
@pytest.mark.parametrize("q_len,k_len", SHAPES[:2])
def test_neural_kernels_match_chunked_path_and_formula(options, q_len, k_len):
    variant = neural_variant(options)
    q, k, v, keep = inputs(q_len, k_len)
    fused = run(variant, q, k, v, keep, TRITON)
    assert_same(fused, run(variant, q, k, v, keep, CHUNKED))
    weights = neural_reference(q.double(), k.double(), keep, neural_variant(options).double())
    torch.testing.assert_close(fused[0].double(), weights @ v.double(), rtol=0, atol=1e-5)


@pytest.mark.slow  # a sweep of tile shapes through Triton's interpreter
@pytest.mark.parametrize("name", ["rational", "softmax_square", "neural"])
@pytest.mark.parametrize("q_len,k_len", [(40, 40), (20, 37)])
@pytest.mark.parametrize("tiles", [None, (Tiles(32, 16, 4), Tiles(16, 32, 4))], ids=["square", "rectangular"])
def test_a_causal_mask_is_computed_in_the_kernels_and_skips_tiles(name, q_len, k_len, tiles, monkeypatch):
    """A purely causal call (no mask and is_causal, as Transformers hands a causal batch without padding) reads no
    mask: CAUSAL computes it from indices and skips the tiles above the diagonal; still equal to the chunked path and
    the float64 formula. Also with rectangular tiles that differ between forward and backward, as the GPU tiles do."""
    if tiles is not None:
        monkeypatch.setattr(triton_attention, "INTERPRETER_TILES", tiles)
    settings = []
    launch = triton_attention._launch_settings
    monkeypatch.setattr(triton_attention, "_launch_settings", lambda *a: settings.append(launch(*a)) or settings[-1])
    variant = neural_variant({}) if name == "neural" else build_variant("expressive", H, D, form=name, scale=True)
    q, k, v, _ = inputs(q_len, k_len)
    keep = causal_keep(q_len, k_len, q.device).expand(B, 1, q_len, k_len)
    fused = run(variant, q, k, v, None, TRITON, causal=True)
    assert settings and all(s[0]["CAUSAL"] and not s[0]["HAS_KEEP"] for s in settings)
    assert_same(fused, run(variant, q, k, v, None, CHUNKED, causal=True))
    double = neural_variant({}).double() if name == "neural" else variant
    reference = neural_reference if name == "neural" else expressive_reference
    weights = reference(q.double(), k.double(), keep, double)
    torch.testing.assert_close(fused[0].double(), weights @ v.double(), rtol=0, atol=1e-5)


def launches(monkeypatch) -> list[dict]:
    """Records the launch settings of every kernel call from here on."""
    settings = []
    launch = triton_attention._launch_settings
    monkeypatch.setattr(triton_attention, "_launch_settings", lambda *a: settings.append(launch(*a)[0]) or launch(*a))
    return settings


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_each_neural_activation_runs_its_own_kernel(activation, monkeypatch):
    """relu and leaky_relu (slope 0.01) both run in the kernels, each with its own slope: routing leaky_relu into
    the relu kernel (or the reverse) changes the scores of every negative pre-activation and fails the comparison."""
    settings = launches(monkeypatch)
    variant = neural_variant({"activation": activation, "proj_dim": 4, "hidden_dims": [4, 3]})
    q, k, v, keep = inputs(19, 21)
    fused = run(variant, q, k, v, keep, TRITON)
    assert settings and {s["SLOPE"] for s in settings} == {0.01 if activation == "leaky_relu" else 0.0}
    assert_same(fused, run(variant, q, k, v, keep, CHUNKED))


@pytest.mark.parametrize("name", ["rational", "square", "softmax_square", "neural", "neural-add"])
def test_an_additive_float_bias_is_read_by_the_kernels(name, monkeypatch):
    """A float mask (finite biases, -1e9 and the dtype's minimum for masked keys, a fully masked row) runs in the
    kernels, read tile by tile, and equals the chunked path's softmax and ratio rules (logits + bias; f x exp(bias))."""
    settings = launches(monkeypatch)
    if name.startswith("neural"):
        variant = neural_variant({"combine": "add"} if name == "neural-add" else {})
    else:
        variant = build_variant("expressive", H, D, form=name, scale=True)
    q, k, v, keep = inputs(19, 21)
    generator = torch.Generator().manual_seed(5)
    bias = 0.5 * torch.randn(B, H, 19, 21, generator=generator)  # per head
    bias = bias.masked_fill(~keep, torch.finfo(torch.float32).min)
    bias[0, :, 3, :5] = -1e9  # a large finite bias: kept, weighs (almost) nothing
    fused = run(variant, q, k, v, bias, TRITON)
    assert settings and all(s["HAS_BIAS"] for s in settings)
    assert_same(fused, run(variant, q, k, v, bias, CHUNKED))


def test_neural_with_other_depths_falls_back_to_the_chunked_path(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_attention, "fused_attention", lambda *a: calls.append(1))
    variant = neural_variant({"hidden_dims": [2]})  # one hidden layer: the kernels cover two
    q, k, v, keep = inputs(19, 19)
    assert_same(run(variant, q, k, v, keep, TRITON), run(variant, q, k, v, keep, CHUNKED))
    assert not calls


@pytest.mark.parametrize("name", ["expressive", "neural"])
@pytest.mark.parametrize("causal", [False, True], ids=["padding", "causal"])
def test_dropout_is_dropout_masks_position_keyed_mask_in_forward_and_backward(name, causal, monkeypatch):
    """The kernels drop exactly dropout_mask.dropout_keep's weights (the mask every path draws, from the call's seed
    and (batch, head, row, key)): output and gradients against the float64 weights times dropout_scale, so the
    forward and backward passes drew the same mask, with tiles that differ between passes."""
    from hf_neural_attention.dropout_mask import dropout_scale, dropout_streams

    p, q_len, k_len = 0.3, 19, 37
    seed = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64)
    devices = []
    monkeypatch.setattr(dispatch, "draw_dropout_seed", lambda device: devices.append(device) or seed)
    monkeypatch.setattr(triton_attention, "INTERPRETER_TILES", (Tiles(16, 32, 4), Tiles(32, 16, 4)))
    variant = build_variant("expressive", H, D) if name == "expressive" else neural_variant({})
    q, k, v, keep = inputs(q_len, k_len, fully_masked_row=False)
    if causal:
        keep = causal_keep(q_len, k_len, q.device).expand(B, 1, q_len, k_len)
    fused = run(variant, q, k, v, keep, TRITON, dropout=p, causal=causal)
    assert devices == [q.device]
    scale = dropout_scale(dropout_streams(seed, B, H), 0, q_len, k_len, p).double()
    assert 0.6 < (scale > 0).double().mean() < 0.8  # about 1 - p kept
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    double = variant.double() if name == "expressive" else neural_variant({}).double()
    reference = expressive_reference if name == "expressive" else neural_reference
    weights = reference(q64, k64, keep, double)
    expected = (weights * scale) @ v64
    torch.testing.assert_close(fused[0].double(), expected, rtol=0, atol=1e-5)
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    for index, grad in enumerate(torch.autograd.grad(expected, [q64, k64, v64], grad_output.double())):
        torch.testing.assert_close(fused[1][index].double(), grad, rtol=0, atol=1e-4, msg=f"gradient {index}")


@pytest.mark.parametrize("name", ["expressive", "neural"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_accumulate_in_float32(name, dtype):
    variant = build_variant("expressive", H, D, form="rational") if name == "expressive" else neural_variant({})
    q, k, v, keep = inputs(19, 19, dtype=dtype)
    fused = run(variant, q, k, v, keep, TRITON)
    assert fused[0].dtype == dtype
    exact = run(variant.float(), q.float(), k.float(), v.float(), keep, CHUNKED)  # the same bf16 values, in fp32
    torch.testing.assert_close(fused[0].float(), exact[0], rtol=0, atol=2e-2)
    for fused_grad, exact_grad in zip(fused[1][:3], exact[1][:3]):
        torch.testing.assert_close(fused_grad.float(), exact_grad, rtol=0, atol=5e-2)


def test_float16_neural_add_hands_the_kernels_float16_q_and_k(monkeypatch):
    """combine="add" in float16: q and k reach the kernels in float16 (upcast inside, TF32 products), not as
    prepare's float32 copies, which ran IEEE float32 dots on CUDA cores and spilled (issue 23.5)."""
    seen = []
    original = triton_attention.fused_attention
    monkeypatch.setattr(triton_attention, "fused_attention",
                        lambda *a: seen.append((a[1].dtype, a[2].dtype)) or original(*a))
    variant = neural_variant({"combine": "add"}).half()
    q, k, v, keep = inputs(19, 19, dtype=torch.float16)
    fused = run(variant, q, k, v, keep, TRITON)
    assert seen == [(torch.float16, torch.float16)]
    exact = run(variant.float(), q.float(), k.float(), v.float(), keep, CHUNKED)
    torch.testing.assert_close(fused[0].float(), exact[0], rtol=0, atol=2e-2)
    for fused_grad, exact_grad in zip(fused[1][:3], exact[1][:3]):
        torch.testing.assert_close(fused_grad.float(), exact_grad, rtol=0, atol=5e-2)


@pytest.mark.parametrize("name", ["rational", "neural-add-per-head"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_grouped_query_heads_read_their_key_value_head_in_the_kernels(name, dropout, monkeypatch):
    """GQA without repeat_kv: k and v with H / 2 heads go into the kernels (query head h reads kv head h // 2), and
    dK, dV come back per kv head, summed over the group, equal to the chunked path on repeated k, v (whose autograd
    sums the copies)."""
    seed = torch.tensor(987654321, dtype=torch.int64)
    heads = 2 * H
    variant = (build_variant("expressive", heads, D, form="rational", scale=True) if name == "rational" else
               build_variant("neural", heads, D, combine="add", per_head=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in variant.parameters():
            parameter.normal_(0.0, 0.5)
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(B, heads, 19, D, generator=generator).requires_grad_()
    k, v = (torch.randn(B, H, 21, D, generator=generator).requires_grad_() for _ in range(2))
    keep = torch.rand(B, 1, 19, 21, generator=generator) < 0.7
    keep[..., -1] = True
    mask = split_attention_mask(keep, 19, 21, False, q.device)
    grad_output = torch.randn(B, heads, 19, D, generator=generator)
    # neural's key parts are per query head (from the repeated keys); the kernels read k, v per kv head
    inputs_ = variant.kernel_inputs(q, k.repeat_interleave(2, 1), mask, D**-0.5)._replace(key=k)
    fused = triton_attention.triton_attention_output(inputs_, v, mask, dropout, seed if dropout > 0.0 else None)
    fused_grads = torch.autograd.grad(fused, [q, k, v], grad_output)
    assert [g.shape for g in fused_grads] == [q.shape, k.shape, v.shape]
    with fast_paths(True, **CHUNKED):
        expected, _ = dispatch.attention(variant, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask,
                                         D**-0.5, 0.0)
    if dropout > 0.0:  # the chunked path draws its own seed: compare against the float64 weights with this mask
        from hf_neural_attention.dropout_mask import dropout_scale, dropout_streams

        with fast_paths(True, **CHUNKED):
            identity = torch.eye(21).expand(B, heads, 21, 21)  # v = identity: the weights themselves
            plain, _ = dispatch.attention(variant, q, k.repeat_interleave(2, 1), identity, mask, D**-0.5, 0.0)
        scale = dropout_scale(dropout_streams(seed, B, heads), 0, 19, 21, dropout)
        expected = (plain * scale) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)
    for index, grad in enumerate(torch.autograd.grad(expected, [q, k, v], grad_output)):
        torch.testing.assert_close(fused_grads[index], grad, rtol=0, atol=1e-4, msg=f"gradient {index}")


@pytest.mark.parametrize("name", ["expressive", "neural"])
def test_grouped_query_heads_and_causal_cache_through_the_attention_function(name):
    variant = build_variant("expressive", H * 2, D) if name == "expressive" else build_variant("neural", H * 2, D)
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(B, H * 2, 5, D, generator=generator)
    k, v = (torch.randn(B, H, 12, D, generator=generator) for _ in range(2))  # two query heads per key head
    outputs = {}
    for settings in (TRITON, CHUNKED):
        with fast_paths(True, **settings):
            outputs[settings["backend"]], _ = ALL_ATTENTION_FUNCTIONS[name](
                Holder(variant, is_causal=True), q, k, v, None, scaling=D**-0.5)
    torch.testing.assert_close(outputs["triton"], outputs["chunked"], rtol=0, atol=1e-5)


def test_the_kernels_are_chosen_only_where_they_apply(monkeypatch):
    calls = []
    original = triton_attention.fused_attention
    monkeypatch.setattr(triton_attention, "fused_attention", lambda *a: calls.append(1) or original(*a))
    variant = build_variant("expressive", H, D)
    q, k, v, keep = inputs(19, 19)
    run(variant, q, k, v, keep, dict(min_size=0))  # "auto" on CPU tensors: the chunked engine
    assert not calls
    run(variant, q, k, v, keep, TRITON)
    assert calls == [1]
    cdape = build_variant("cdape", H, D)  # stays on the chunked path, even when the kernels are forced
    assert_same(run(cdape, q, k, v, keep, TRITON), run(cdape, q, k, v, keep, CHUNKED), output_atol=0, grad_atol=0)
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf")) + 0.5 * keep  # an additive bias: kernels too
    mask = split_attention_mask(bias, 19, 19, False, q.device)
    with fast_paths(True, **TRITON):
        dispatch.attention(variant, q, k, v, mask, D**-0.5, 0.0)
    assert calls == [1, 1]
    with pytest.raises(ValueError, match=r"backend='cuda' is not valid; choose one of \['auto', 'triton', 'chunked'\]"):
        fast_paths(True, backend="cuda")
    with pytest.raises(ValueError, match="FAST_PATHS.backend='gpu' is not valid"):
        hfna.FAST_PATHS.backend = "gpu"


@pytest.mark.slow  # a whole model through Triton's interpreter
@pytest.mark.parametrize("variant", ["expressive", "neural"])
def test_a_whole_model_trains_the_same_through_the_kernels(variant):
    ids = torch.randint(1, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    results = {}
    for settings in (TRITON, CHUNKED):
        model = converted(ALL_BUILDERS["gpt2"], variant).train()
        with fast_paths(True, **settings):
            loss = model(ids, labels=ids).loss
            loss.backward()
        results[settings["backend"]] = (loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results["triton"][0], results["chunked"][0], rtol=0, atol=1e-5)
    for name, grad in results["chunked"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=0, atol=1e-4, msg=name)


def test_gpu_benchmark_refuses_clearly_without_a_gpu(monkeypatch, capsys):
    from hf_neural_attention.experiments import benchmark_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark_cuda.main(["--sizes", "1024"]) == 2
    assert "--device cuda needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_tiles_follow_the_head_size_the_gpu_generation_and_the_dtype(monkeypatch):
    """Tiles per BLOCK_D (d_h 64 and 128 differ; other sizes take the next entry up, or the largest), then
    TILE_OVERRIDES per GPU generation and dtype, the more specific scope last (neural's d_h 64 backward: 32x64/8 on
    sm_90, 32x32/4 on sm_80)."""
    monkeypatch.setattr(triton_kernels, "interpreted", lambda: False)
    cuda = torch.device("cuda")
    neural = triton_kernels.SCORE_NEURAL
    for arch, backward in ((80, Tiles(32, 32, 4)), (90, Tiles(32, 64, 8))):
        monkeypatch.setattr(triton_attention, "_arch", lambda device, arch=arch: arch)
        assert triton_attention._tiles(neural, 64, cuda, torch.bfloat16)[1] == backward
    rational = triton_kernels.SCORE_RATIONAL
    assert triton_attention._tiles(rational, 64, cuda)[0] == Tiles(128, 32, 8)
    assert triton_attention._tiles(rational, 24, cuda) == triton_attention._tiles(rational, 64, cuda)
    assert triton_attention._tiles(rational, 96, cuda) == triton_attention._tiles(rational, 128, cuda) != \
        triton_attention._tiles(rational, 64, cuda)
    assert triton_attention._tiles(rational, 256, cuda) == triton_attention._tiles(rational, 128, cuda)
    by_arch, by_dtype, by_both = ((Tiles(16, 16, w), Tiles(16, 16, w)) for w in (1, 2, 4))
    monkeypatch.setattr(triton_attention, "TILE_OVERRIDES", {
        (rational, 90, None): {64: by_arch}, (rational, None, torch.float16): {64: by_dtype},
        (rational, 90, torch.float16): {64: by_both}})
    gpu_tiles = triton_attention.gpu_tiles
    assert gpu_tiles(rational, 64, 90, torch.bfloat16) == by_arch
    assert gpu_tiles(rational, 64, 80, torch.float16) == by_dtype
    assert gpu_tiles(rational, 64, 90, torch.float16) == by_both
    assert gpu_tiles(rational, 64, 80, torch.bfloat16) == gpu_tiles(triton_kernels.SCORE_SQUARE, 64, 80, None)
    assert gpu_tiles(rational, 128, 90, torch.float16) == triton_attention.GPU_TILES[rational][128]


def test_float32_products_follow_pytorchs_precision_setting():
    """IEEE products for float32 under PyTorch's default "highest", TF32 when the user allows it; upcast float16
    always TF32, which holds every float16 value exactly (so no precision is lost against float16 itself)."""
    choose = triton_attention._float32_products
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert (choose(torch.float32), choose(torch.float16)) == ("ieee", "tf32")
        torch.set_float32_matmul_precision("high")
        assert choose(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).half().float()
    as_tf32 = (values.view(torch.int32) & ~0x1FFF).view(torch.float32)  # keep TF32's 10 mantissa bits
    assert torch.equal(as_tf32, values)


@pytest.mark.slow
def test_the_kernels_compile_for_an_h100(tmp_path):
    """What only the GPU compiler checks (tl.dot's shape and dtype rules, layouts, shared memory, registers), which
    the interpreter skips: the neural launches (the most code; bf16, causal, dropout, the GPU tiles) compiled to a
    cubin for sm_90 with the ptxas in the triton wheel, in a process without TRITON_INTERPRET. The whole matrix of
    configurations and both GPU generations: scripts/check_triton_compile.py, results/triton_compile/."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "check_triton_compile.py"),
         "--configs", "neural-bf16-causal-dropout-d64", "--targets", "90", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [r["kernel"] for r in records] == ["forward", "backward"]
    assert [r["num_warps"] for r in records] == [8, 8]  # sm_90's GPU tiles (64x32/8, 32x64/8), not the interpreter's
    assert all(r["spilled"] == 0 for r in records), records


@pytest.mark.parametrize("q_len,k_len,causal,p", [(19, 21, False, 0.0), (20, 37, True, 0.0), (19, 21, False, 0.3),
                                                  (40, 40, True, 0.3)])
def test_the_dot_reference_kernel_of_the_cost_model_is_exact(q_len, k_len, causal, p):
    """triton_dot_reference (FlashAttention-2's algorithm, counted by the cost model beside the project's kernels)
    against float64 softmax attention with dropout_mask's mask: so its instruction counts are of a correct kernel."""
    from hf_neural_attention.dropout_mask import dropout_scale, dropout_streams
    from hf_neural_attention.triton_dot_reference import dot_reference_attention

    q, k, v, keep = inputs(q_len, k_len)
    if causal:
        keep = causal_keep(q_len, k_len, q.device).expand(B, 1, q_len, k_len)
    seed = torch.tensor(123456789123, dtype=torch.int64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = dot_reference_attention(q, k, v, keep, causal, D**-0.5, p, seed)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [q, k, v], grad_output)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    weights = torch.softmax((q64 @ k64.transpose(-1, -2) * D**-0.5).masked_fill(~keep, float("-inf")), -1)
    weights = weights.nan_to_num(0.0)  # a row with no visible key: zeros, as the kernel (and SDPA's flash) give
    if p > 0:
        weights = weights * dropout_scale(dropout_streams(seed, B, H), 0, q_len, k_len, p).double()
    expected = weights @ v64
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    for index, grad in enumerate(torch.autograd.grad(expected, [q64, k64, v64], grad_output.double())):
        torch.testing.assert_close(grads[index].double(), grad, rtol=0, atol=1e-4, msg=f"gradient {index}")


@pytest.mark.parametrize("name", ["rational", "neural"])
def test_a_mask_whose_offsets_pass_2_to_the_31_is_read_exactly(name):
    """64-bit offsets: a boolean keep mask that is a view into a 3 GiB buffer (batch 3, batch stride 3 * 2^29 bytes,
    which fits in int32 while 2 * stride does not; only the allocation is big, its untouched pages are never
    committed), through forward and backward against the chunked path on the same mask. With 32-bit offsets the
    third batch's rows are read 1 GiB before the buffer (a segmentation fault)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, H, n, D, generator=generator) for n in (19, 21, 21))
    keep = torch.rand(3, 1, 19, 21, generator=generator) < 0.7
    keep[..., -1] = True
    stride = 3 * 2**29
    buffer = torch.empty(2 * stride + keep[0].numel(), dtype=torch.bool)
    far = buffer.as_strided(keep.shape, (stride, keep[0].numel(), keep.shape[-1], 1))
    far.copy_(keep)
    variant = neural_variant({}) if name == "neural" else build_variant("expressive", H, D, form=name)
    assert_same(run(variant, q, k, v, far, TRITON), run(variant, q, k, v, keep, CHUNKED))
