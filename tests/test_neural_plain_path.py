"""neural's plain path (every decoding step takes it): one MLP shared by all heads runs as 2-D products over all pairs
(`_shared_mlp_scores`). It must give the rule exactly as prepare and score state it (what the chunked engine runs),
forward and backward, for any batch, grouped-query ratio, query length (one decoding row or many), mask and option."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_neural_attention.masks import split_attention_mask
from hf_neural_attention.registry import build_variant
from hf_neural_attention.variant import AttentionVariant

SHARED_OPTIONS = [
    {},
    {"combine": "add"},
    {"activation": "leaky_relu"},
    {"init": "alive"},
    {"proj_dim": 3, "hidden_dims": [4, 3, 2]},
    {"proj_dim": 2, "hidden_dims": [5]},
]


@st.composite
def problems(draw):
    options = draw(st.sampled_from(SHARED_OPTIONS))
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    k_len = draw(st.integers(1, 9))
    q_len = draw(st.sampled_from([1, k_len]))  # a decoding row, or the whole sequence
    padded = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return options, batch, heads, kv_heads, q_len, k_len, padded, seed


def scorer_and_inputs(options, batch, heads, kv_heads, q_len, k_len, padded, seed, head_dim=64):
    torch.manual_seed(seed)
    scorer = build_variant("neural", heads, head_dim, **options).double()
    with torch.no_grad():  # weights away from the init, hidden units alive, so every layer changes the scores
        for parameter in scorer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        for bias in list(scorer.mlp_biases)[:-1]:
            bias.abs_().add_(0.5)
        scorer.mlp_weights[-1].mul_(4.0)
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, q_len, head_dim, generator=generator, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator, dtype=torch.float64, requires_grad=True)
    attention_mask = None
    if padded and k_len > 1:  # the first key of the first row is padding
        attention_mask = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool)
        attention_mask[0, :, :, 0] = False
    mask = split_attention_mask(attention_mask, q_len, k_len, q_len > 1, query.device)
    return scorer, query, key, mask


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_the_shared_mlp_plain_path_is_the_stated_rule(problem):
    scorer, query, key, mask = scorer_and_inputs(*problem)
    scaling = query.shape[-1] ** -0.5
    fast = scorer.attention_weights(query, key, mask, scaling)
    stated = AttentionVariant.attention_weights(scorer, query, key, mask, scaling)  # prepare + score
    torch.testing.assert_close(fast, stated, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(fast)
    leaves = [query, key, *scorer.parameters()]
    fast_grads = torch.autograd.grad(fast, leaves, grad)
    stated_grads = torch.autograd.grad(stated, leaves, grad)
    for fast_grad, stated_grad in zip(fast_grads, stated_grads):
        torch.testing.assert_close(fast_grad, stated_grad, rtol=1e-10, atol=1e-12)


def test_the_case_exercises_every_layer():
    """The comparison above means something only if the MLP's layers change the scores: with the perturbed weights,
    the weights of a row vary over its keys, and zeroing the second layer's weights changes them."""
    scorer, query, key, mask = scorer_and_inputs({}, 2, 4, 2, 1, 9, False, 3)
    with torch.no_grad():
        weights = scorer.attention_weights(query, key, mask, 0.25)
        assert float(weights.std(-1).mean()) > 1e-3
        scorer.mlp_weights[1].zero_()
        assert not torch.allclose(scorer.attention_weights(query, key, mask, 0.25), weights)


def test_per_head_scorers_run_the_stated_rule():
    scorer, query, key, mask = scorer_and_inputs({"per_head": True}, 2, 4, 2, 1, 7, True, 5)
    stated = AttentionVariant.attention_weights(scorer, query, key, mask, 0.25)
    torch.testing.assert_close(scorer.attention_weights(query, key, mask, 0.25), stated, rtol=0, atol=0)


def test_the_last_bias_gets_its_zero_gradient_under_autograd():
    """The softmax cancels the last bias, so a call without gradients leaves it out; with gradients it is kept, and
    its gradient is (up to rounding) the true 0."""
    scorer, query, key, mask = scorer_and_inputs({}, 1, 2, 2, 3, 3, False, 7)
    weights = scorer.attention_weights(query, key, mask, 0.25)
    (grad,) = torch.autograd.grad(weights, [scorer.mlp_biases[2]], torch.randn_like(weights))
    assert float(grad.abs().max()) < 1e-12


def test_parametrized_parameters_are_read_where_they_live():
    """The plain path reads parameters from the modules' parameter dicts; a parametrized one lives elsewhere (it is
    computed on access), so the scores must follow the parametrization, on every path alike."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, tensor: torch.Tensor) -> torch.Tensor:
            return tensor * 2

    scorer, query, key, mask = scorer_and_inputs({}, 1, 4, 2, 1, 6, False, 11)
    before = scorer.attention_weights(query, key, mask, 0.25).detach()
    parametrize.register_parametrization(scorer, "key_down_weight", Doubled())
    parametrize.register_parametrization(scorer.mlp_weights, "1", Doubled())
    after = scorer.attention_weights(query, key, mask, 0.25)
    assert not torch.allclose(after, before)
    stated = AttentionVariant.attention_weights(scorer, query, key, mask, 0.25)
    torch.testing.assert_close(after, stated, rtol=1e-12, atol=1e-12)
