"""Each registered attention function against a float64 re-statement of its paper's formula, written here
independently of the package (loops and repeat + cat, as the papers and reference code state them)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_neural_attention as hfna
from hf_neural_attention.registry import build_variant

B, H, H_KV, LQ, LK, D = 2, 4, 2, 5, 7, 64


class Holder(nn.Module):
    """Stands in for a Transformers attention module: holds the variant and the causality flag."""

    def __init__(self, variant_module: nn.Module, is_causal: bool = False):
        super().__init__()
        self.attention_variant = variant_module
        self.is_causal = is_causal


def random_inputs(dtype=torch.float64, q_len=LQ, k_len=LK, kv_heads=H_KV, scale=1.0):
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, q_len, D, generator=generator, dtype=torch.float64) * scale
    k = torch.randn(B, kv_heads, k_len, D, generator=generator, dtype=torch.float64) * scale
    v = torch.randn(B, kv_heads, k_len, D, generator=generator, dtype=torch.float64)
    keep = torch.rand(B, 1, q_len, k_len, generator=generator) < 0.7
    keep[..., -1] = True  # no fully masked rows here; those are tested on their own
    return q.to(dtype), k.to(dtype), v.to(dtype), keep


def as_additive(keep: torch.Tensor, dtype, fill: str) -> torch.Tensor:
    masked = float("-inf") if fill == "-inf" else torch.finfo(dtype).min
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, masked)


def repeat_heads(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(H // x.shape[1], dim=1)


def softmax_reference(logits, keep, bias):
    logits = logits + bias
    logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=-1)


# ---- float64 re-statements of the papers' formulas ----------------------------------------------------------

def dot_reference(q, k, keep, bias, scaling, module):
    return softmax_reference(q @ k.transpose(-1, -2) * scaling, keep, bias)


def expressive_reference(q, k, keep, bias, scaling, module):
    s = q @ k.transpose(-1, -2)
    if module.scale:
        s = s / math.sqrt(D)
    f = {"rational": s**2 / (1 + s**2), "square": s**2, "softmax_square": torch.exp(s**2)}[module.form]
    f = f * torch.exp(bias)
    f = f.masked_fill(~keep, 0.0)
    return f / f.sum(-1, keepdim=True)


def neural_reference(q, k, keep, bias, scaling, module):
    """The reference code's layout: down-project, repeat + cat into [b, H, n, n, 2d'], MLP, softmax."""
    heads = []
    for h in range(H):
        g = h if module.per_head else 0
        q_small = q[:, h] @ module.query_down_weight[g].T + module.query_down_bias[g]  # [B, Lq, d']
        k_small = k[:, h] @ module.key_down_weight[g].T + module.key_down_bias[g]  # [B, Lk, d']
        pair = torch.cat(
            [q_small[:, :, None, :].repeat(1, 1, k.shape[2], 1), k_small[:, None, :, :].repeat(1, q.shape[2], 1, 1)],
            dim=-1,
        )  # [B, Lq, Lk, 2d']
        x = pair
        for index, (w, b) in enumerate(zip(module.mlp_weights, module.mlp_biases)):
            x = x @ w[g].T + b[g]
            if index < len(module.mlp_weights) - 1:
                x = torch.relu(x)
        heads.append(x[..., 0])
    scores = torch.stack(heads, dim=1)
    if module.combine == "add":
        scores = scores + q @ k.transpose(-1, -2) * scaling
    return softmax_reference(scores, keep, bias)


def cdape_reference(q, k, keep, bias, scaling, module):
    q_len, k_len = q.shape[2], k.shape[2]
    x = q @ k.transpose(-1, -2) * scaling  # [B, H, Lq, Lk]
    i = torch.arange(k_len - q_len, k_len, dtype=torch.float64)[:, None]
    j = torch.arange(k_len, dtype=torch.float64)[None, :]
    distance = (i - j).abs()
    if module.bias == "alibi":
        slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
        position = -slopes[:, None, None] * distance
    elif module.bias == "kerple":
        r1 = module.kerple_r1.clamp(min=1e-2)[:, None, None]
        r2 = module.kerple_r2.clamp(min=1e-2)[:, None, None]
        position = -r1 * torch.log(1 + r2 * distance)
    else:
        position = None

    def conv_1xk(z, conv):
        """Conv2d with a (1, k) kernel and zero padding along keys, as explicit shifted sums."""
        width = conv.weight.shape[-1]
        out = conv.bias[None, :, None, None].expand(z.shape[0], -1, z.shape[2], z.shape[3]).clone()
        for t in range(width):
            offset = t - width // 2
            shifted = torch.zeros_like(z)
            if offset >= 0:
                shifted[..., : k_len - offset] = z[..., offset:]
            else:
                shifted[..., -offset:] = z[..., : k_len + offset]
            out = out + torch.einsum("bcqk,dc->bdqk", shifted, conv.weight[:, :, 0, t])
        return out

    z = x if position is None else torch.cat([x, position.expand(x.shape[0], -1, -1, -1)], dim=1)
    z = z.masked_fill(~keep, 0.0)
    hidden = conv_1xk(z, module.conv_in)
    hidden = torch.where(hidden > 0, hidden, 0.01 * hidden).masked_fill(~keep, 0.0)
    y = conv_1xk(hidden, module.conv_out)
    logits = x + y + (0 if position is None else position)
    return softmax_reference(logits, keep, bias)


REFERENCES = {"dot": dot_reference, "expressive": expressive_reference, "neural": neural_reference,
              "cdape": cdape_reference}

CASES = [
    ("dot", {}),
    ("expressive", {"form": "rational", "scale": False}),
    ("expressive", {"form": "rational", "scale": True}),
    ("expressive", {"form": "square", "scale": True}),
    ("expressive", {"form": "softmax_square", "scale": True}),
    ("neural", {}),
    ("neural", {"per_head": True, "proj_dim": 4, "hidden_dims": [6, 3, 2]}),
    ("neural", {"combine": "add"}),
    ("cdape", {"zero_init": False}),
    ("cdape", {"zero_init": False, "bias": "alibi", "kernel_size": 5}),
    ("cdape", {"zero_init": False, "bias": "kerple", "hidden_size": 8}),
]


def make_module(variant, options, dtype=torch.float64):
    torch.manual_seed(3)
    module = build_variant(variant, H, D, **options).to(dtype)
    with torch.no_grad():  # move zero-initialised parts away from zero so they count
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
        if variant == "neural":
            # The paper's 2d' -> d' -> d'/2 -> 1 MLP has a single ReLU unit for d_h = 64, often dead at a random
            # init (constant scores); positive hidden biases keep every unit alive so the test sees the MLP.
            for bias in module.mlp_biases[:-1]:
                bias.add_(1.0)
    return module


def run_registered(variant, module, q, k, v, mask, is_causal=False, scaling=D**-0.5):
    function = ALL_ATTENTION_FUNCTIONS[variant]
    return function(Holder(module, is_causal), q, k, v, mask, scaling=scaling, dropout=0.0)


def reference_output(variant, module, q, k, v, keep, bias):
    module64 = module.to(torch.float64)
    with torch.no_grad():
        weights = REFERENCES[variant](
            q.double(), repeat_heads(k.double()), keep, bias, D**-0.5, module64
        )
    return (weights @ repeat_heads(v.double())).transpose(1, 2), weights


@pytest.mark.parametrize("variant,options", CASES, ids=[f"{v}-{o}" for v, o in CASES])
@pytest.mark.parametrize("mask_kind", ["bool", "additive-min", "additive-inf", "additive-with-bias"])
def test_registered_function_matches_float64_reference(variant, options, mask_kind):
    q, k, v, keep = random_inputs(scale=0.3)
    module = make_module(variant, options)
    bias = torch.zeros(keep.shape, dtype=torch.float64)
    if mask_kind == "bool":
        mask = keep
    elif mask_kind == "additive-with-bias":
        bias = torch.randn(keep.shape, dtype=torch.float64).masked_fill(~keep, 0.0)
        mask = as_additive(keep, torch.float64, "min") + bias
    else:
        mask = as_additive(keep, torch.float64, mask_kind.split("-")[1])
    with torch.no_grad():
        output, weights = run_registered(variant, module, q, k, v, mask)
    expected_output, expected_weights = reference_output(variant, module, q, k, v, keep, bias)
    if variant != "dot":  # the case must exercise the score rule: weights vary over kept keys
        assert float(weights.std(-1).mean()) > 1e-3
    torch.testing.assert_close(weights, expected_weights, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(output, expected_output, rtol=1e-9, atol=1e-12)
    assert bool((weights.masked_select(~keep.expand_as(weights)) == 0).all()), "a masked key got weight"


@pytest.mark.parametrize("variant,options", CASES, ids=[f"{v}-{o}" for v, o in CASES])
def test_float32_close_to_float64_reference_with_gqa(variant, options):
    q, k, v, keep = random_inputs(dtype=torch.float32, scale=0.3)
    module = make_module(variant, options, dtype=torch.float32)
    with torch.no_grad():
        output, _ = run_registered(variant, module, q, k, v, keep)
    expected, _ = reference_output(variant, module, q, k, v, keep, torch.zeros(keep.shape, dtype=torch.float64))
    torch.testing.assert_close(output.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_causal_module_without_mask_is_still_causal(variant):
    """A None mask on a causal module is rebuilt as the (bottom-right aligned) causal pattern, never dropped."""
    q, k, v, _ = random_inputs(q_len=4, k_len=6)
    module = make_module(variant, dict(CASES)[variant] if variant != "expressive" else {"scale": True})
    keep = torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2)[None, None].expand(B, 1, 4, 6)
    with torch.no_grad():
        output, _ = run_registered(variant, module, q, k, v, None, is_causal=True)
        expected, _ = run_registered(variant, module, q, k, v, keep, is_causal=True)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_expressive_zero_rows_give_zero_weights_not_nan():
    q, k, v, keep = random_inputs()
    q[:, :, 0] = 0.0  # scores all zero -> f(s) all zero
    keep = keep.clone()
    keep[:, :, 1] = False  # a fully masked row
    for form in ("rational", "square", "softmax_square"):
        module = build_variant("expressive", H, D, form=form, scale=True)
        output, weights = run_registered("expressive", module, q, k, v, keep)
        assert torch.isfinite(output).all() and torch.isfinite(weights).all(), form
        assert (weights[:, :, 1] == 0).all(), form
        if form != "softmax_square":  # exp(0) = 1 is a perfectly good weight
            assert (weights[:, :, 0] == 0).all(), form


def test_expressive_fp32_large_scores_do_not_overflow():
    """The reference masks with -1e20 before squaring (inf/NaN in fp32); here masking acts after f."""
    q, k, v, keep = random_inputs(dtype=torch.float32, scale=30.0)
    module = build_variant("expressive", H, D, form="square")
    output, weights = run_registered("expressive", module, q, k, v, as_additive(keep, torch.float32, "min"))
    assert torch.isfinite(output).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_attention_function_without_scaling_uses_head_dim_to_the_minus_half(variant):
    """Models that pass no `scaling` get 1/sqrt(d_h), as Transformers' own attention functions do."""
    q, k, v, keep = random_inputs(q_len=5, k_len=7)
    options = {"scale": True} if variant == "expressive" else dict(CASES).get(variant, {})
    module = make_module(variant, options)
    function = ALL_ATTENTION_FUNCTIONS[variant]
    with torch.no_grad():
        implicit, _ = function(Holder(module), q, k, v, keep)
        explicit, _ = function(Holder(module), q, k, v, keep, scaling=D**-0.5)
        other, _ = function(Holder(module), q, k, v, keep, scaling=1.0)
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    if variant != "neural":  # the paper's neural score has no scaling at all
        assert (implicit - other).abs().max() > 1e-3


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "chunked"])
def test_softmax_square_with_the_largest_score_on_a_masked_key(fast):
    """exp(s^2 - row max) must take the max over visible keys only: with the largest |s| on a masked key, a max over
    all keys underflows every visible weight."""
    from hf_neural_attention.runtime import fast_paths

    q, k, v, keep = random_inputs(q_len=5, k_len=7, scale=0.5)
    direction = torch.zeros(D, dtype=torch.float64)
    direction[0] = 1.0
    q = q + 3.0 * direction  # every query shares a component ...
    k = k.clone()
    k[:, :, 2] = 200.0 * direction  # ... that key 2 holds at scale: s^2 above 1000 there, about 1 elsewhere
    keep = keep.clone()
    keep[:, :, :, 2] = False
    keep[..., -1] = True
    module = build_variant("expressive", H, D, form="softmax_square", scale=True).double()
    with torch.no_grad(), fast_paths(fast, **({"min_size": 0, "chunk_size": 2} if fast else {})):
        output, _ = run_registered("expressive", module, q, k, v, keep)
    scores = (q @ repeat_heads(k).transpose(-1, -2)) / math.sqrt(D)
    assert (scores.abs().amax(-1) == scores.abs()[..., 2]).all(), "the masked key must hold every row's largest |s|"
    assert (scores[..., 2].square() - scores.square().masked_fill(~keep, 0).amax(-1)).min() > 745  # exp(-that) underflows even in float64
    expected, _ = reference_output("expressive", module, q, k, v, keep, torch.zeros(keep.shape, dtype=torch.float64))
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "chunked"])
def test_kerple_parameters_below_their_clamp(fast):
    """Kerple's r1, r2 are clamped to >= 1e-2 (the reference's rule), also when training pushed them negative."""
    from hf_neural_attention.runtime import fast_paths

    q, k, v, keep = random_inputs(scale=0.3)
    module = make_module("cdape", {"zero_init": False, "bias": "kerple", "hidden_size": 8})
    with torch.no_grad():
        module.kerple_r1.copy_(torch.tensor([-1.0, 0.005, 0.5, -0.2]))
        module.kerple_r2.copy_(torch.tensor([0.3, -2.0, 0.001, 0.8]))
        with fast_paths(fast, **({"min_size": 0, "chunk_size": 2} if fast else {})):
            output, _ = run_registered("cdape", module, q, k, v, keep)
    expected, _ = reference_output("cdape", module, q, k, v, keep, torch.zeros(keep.shape, dtype=torch.float64))
    torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-11)
