"""The fast paths in the configurations people train in: attention dropout (mask regenerated in backward from a
per-call seed), bfloat16/float16 inputs, autocast, and large-magnitude scores; against the plain path with the same
dropout mask and against the float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_neural_attention as hfna
from hf_neural_attention import attention_interface
from hf_neural_attention import chunked
from hf_neural_attention.runtime import fast_paths
from conftest import ALL_BUILDERS, VOCAB, converted
from test_formulas import CASES, D, H, Holder, make_module, random_inputs, reference_output

FORCED = {"min_size": 0, "chunk_size": 3}
VARIANTS = {"expressive": {"form": "rational", "scale": True}, "neural": {"per_head": True, "proj_dim": 4,
            "hidden_dims": [6, 3]}, "cdape": {"zero_init": False, "bias": "kerple", "hidden_size": 8}}
P = 0.25


def run(variant, module, q, k, v, keep, *, fast, seed, settings=FORCED):
    """Output and gradients of the registered function in training mode with attention dropout P."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with fast_paths(fast, **(settings if fast else {})):
        output, weights = ALL_ATTENTION_FUNCTIONS[variant](Holder(module).train(), q, k, v, keep,
                                                           scaling=D**-0.5, dropout=P)
    assert (weights is None) == fast
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(11), dtype=output.dtype)
    (output * upstream).sum().backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad, **{n: p.grad for n, p in module.named_parameters()}}
    return output.detach(), grads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dropout_fast_path_equals_plain_path_with_the_same_seed(variant):
    """One dropout mask per call whatever the path and the chunking: the plain path, and the chunked engine at two
    chunk sizes, give the same output and gradients in training mode from the same seed."""
    q, k, v, keep = random_inputs(q_len=7, k_len=10, scale=0.3)  # float64, GQA 4/2, a random boolean mask
    module = make_module(variant, VARIANTS[variant])
    plain_output, plain_grads = run(variant, module, q, k, v, keep, fast=False, seed=5)
    for settings in (FORCED, {"min_size": 0, "chunk_size": 4}):
        fast_output, fast_grads = run(variant, module, q, k, v, keep, fast=True, seed=5, settings=settings)
        torch.testing.assert_close(fast_output, plain_output, rtol=1e-9, atol=1e-11)
        for name, expected in plain_grads.items():
            torch.testing.assert_close(fast_grads[name], expected, rtol=1e-8, atol=1e-10, msg=name)
    other_output, _ = run(variant, module, q, k, v, keep, fast=False, seed=6)
    assert not torch.allclose(other_output, plain_output), "another seed draws another mask"


def gpt2_with_dropout() -> GPT2LMHeadModel:
    """A stock GPT-2 config's dropouts (attn_pdrop 0.1 and the others), tiny sizes."""
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0,
                        eos_token_id=0)
    assert config.attn_pdrop == 0.1
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dropout_training_is_reproducible_and_eval_has_none(variant, monkeypatch):
    calls = []
    original = chunked._forward_chunks
    monkeypatch.setattr(chunked, "_forward_chunks", lambda *args: calls.append(1) or original(*args))
    torch.manual_seed(0)
    model = hfna.convert(gpt2_with_dropout(), variant, layers="all", **VARIANTS[variant])
    ids = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))

    def loss(seed):
        torch.manual_seed(seed)
        with fast_paths(True, **FORCED):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        return out.loss.item()

    model.train()
    assert loss(7) == loss(7), "the same seed must give the same loss"
    assert loss(7) != loss(8), "attention (and other) dropout must act in training"
    assert calls, "the fast path did not run"
    model.eval()
    with torch.no_grad(), fast_paths(True, **FORCED):
        eval_logits = model(input_ids=ids).logits
    with torch.no_grad(), fast_paths(False):
        plain_logits = model(input_ids=ids).logits
    torch.testing.assert_close(eval_logits, plain_logits, rtol=1e-5, atol=1e-5)


# ---- half precision and autocast ----------------------------------------------------------------------------------

HALF_TOLERANCE = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


@pytest.mark.parametrize("variant,options", [c for c in CASES if c[0] != "dot"], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_fast_path_matches_float64_reference(variant, options, dtype):
    """The reference runs in float64 on the same (rounded) inputs and parameters: what is measured is the error of
    computing in half precision, not of rounding the inputs."""
    q, k, v, keep = random_inputs(dtype=dtype, scale=0.3)
    half_module = make_module(variant, options, dtype=dtype)
    expected, _ = reference_output(variant, copy.deepcopy(half_module), q, k, v, keep,
                                   torch.zeros(keep.shape, dtype=torch.float64))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with fast_paths(True, **FORCED):
        output, weights = ALL_ATTENTION_FUNCTIONS[variant](Holder(half_module), q, k, v, keep, scaling=D**-0.5,
                                                           dropout=0.0)
    assert weights is None and output.dtype == dtype
    torch.testing.assert_close(output.double(), expected, **HALF_TOLERANCE[dtype])
    output.float().square().sum().backward()
    for tensor in (q, k, v, *half_module.parameters()):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("variant", ["dot", *VARIANTS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_large_scores_stay_finite(variant, dtype, fast):
    """|q.k| around 1e5-1e6: beyond float16's range (65504) and far beyond where s^2 overflows it."""
    q, k, v, keep = random_inputs(scale=40.0)
    module = make_module(variant, {} if variant == "dot" else VARIANTS[variant], dtype=dtype)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    with fast_paths(fast, **(FORCED if fast else {})):
        output, _ = ALL_ATTENTION_FUNCTIONS[variant](Holder(module), q, k, v, keep, scaling=1.0, dropout=0.0)
    assert torch.isfinite(output).all()
    output.float().sum().backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()


@torch.no_grad()
def scale_gpt2_queries_and_keys(model: GPT2LMHeadModel, factor: float) -> None:
    for block in model.transformer.h:
        width = block.attn.c_attn.weight.shape[0]
        block.attn.c_attn.weight[:, : 2 * width] *= factor  # Conv1D [in, 3 * width]: query and key columns


@pytest.mark.parametrize("variant", ["dot", *VARIANTS])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_float16_model_with_huge_scores_stays_finite(variant, fast):
    """The whole model in float16 with attention scores around 1e5 (far past float16's 65504): loss, logits and every
    gradient stay finite, as with Transformers' SDPA on the same weights."""
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    stock = copy.deepcopy(converted(lambda: ALL_BUILDERS["gpt2"](), "dot", perturb=False))
    hfna.revert(stock)
    scale_gpt2_queries_and_keys(stock, 500.0)
    stock.half()
    model = converted(ALL_BUILDERS["gpt2"], variant)
    scale_gpt2_queries_and_keys(model, 500.0)
    model.half()
    with torch.no_grad():  # the first layer's raw scores q.k really leave float16's range
        block, positions = model.transformer.h[0], torch.arange(ids.shape[1])
        embedded = model.transformer.wte(ids) + model.transformer.wpe(positions)
        query, key, _ = block.attn.c_attn(block.ln_1(embedded)).float().split(model.config.n_embd, dim=-1)
        heads = model.config.n_head
        query, key = (t.view(2, 12, heads, -1).transpose(1, 2) for t in (query, key))  # [B, H, L, D]
        assert (query @ key.transpose(-1, -2)).abs().max() > 65504
    assert torch.isfinite(stock(ids, labels=ids).loss), "premise: SDPA stays finite on these weights"
    with fast_paths(fast, **(FORCED if fast else {})):
        output = model(ids, labels=ids)
        output.loss.backward()
    assert torch.isfinite(output.loss) and torch.isfinite(output.logits).all()
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_autocast_bf16_casts_inputs_and_fast_path_is_as_accurate_as_plain(arch, variant, monkeypatch):
    """Under bf16 autocast every engine gets q, k and v in bfloat16 (SDPA's rule; a Llama-family model hands float32
    rotary q, k next to a bfloat16 v), on every CPU: the dtypes are asserted, not only that a fast path ran. Then the
    fast path's gradients are as close to float32 as the plain path's. Per-parameter errors are bf16 noise that the
    rest of the model amplifies chaotically (a one-ulp change of one attention output moves every later gradient), so
    the comparison is over all parameters at once."""
    received = []
    original = attention_interface.dispatch_attention
    monkeypatch.setattr(attention_interface, "dispatch_attention", lambda variant_, q, k, v, *args, **kwargs: (
        received.append((q.dtype, k.dtype, v.dtype)) or original(variant_, q, k, v, *args, **kwargs)))
    calls = []
    chunked_forward = chunked._forward_chunks
    monkeypatch.setattr(chunked, "_forward_chunks", lambda *args: calls.append(1) or chunked_forward(*args))
    generator = torch.Generator().manual_seed(3)
    if arch == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator), "labels": torch.tensor([1, 3])}
    else:
        ids = torch.randint(1, VOCAB, (2, 12), generator=generator)
        inputs = {"input_ids": ids, "labels": ids}
    results = {}
    for name, autocast, fast in (("fp32", False, False), ("plain", True, False), ("fast", True, True)):
        received.clear()
        model = converted(ALL_BUILDERS[arch], variant).train()  # float32 weights, as autocast expects
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), fast_paths(fast, **(FORCED if fast else {})):
            output = model(**inputs)
        output.loss.backward()
        expected_dtype = torch.bfloat16 if autocast else torch.float32
        assert received and all(dtypes == (expected_dtype,) * 3 for dtypes in received), (name, received)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (output.loss.item(), grads)
    assert calls, "the fast path did not run under autocast"
    loss_fp32 = results["fp32"][0]
    assert abs(results["fast"][0] - loss_fp32) <= 2 * abs(results["plain"][0] - loss_fp32) + 1e-3
    exact = torch.cat([g.flatten() for g in results["fp32"][1].values()])
    errors = {}
    for name in ("fast", "plain"):
        assert all(torch.isfinite(g).all() for g in results[name][1].values()), name
        errors[name] = (torch.cat([results[name][1][n].flatten() for n in results["fp32"][1]]) - exact).norm()
    assert errors["fast"] <= 2 * errors["plain"] + 1e-3 * exact.norm(), errors
