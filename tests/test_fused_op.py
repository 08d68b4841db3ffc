"""The fused kernels as torch.library custom ops (triton_attention.py): torch.library.opcheck on the forward and
backward ops (schema, fake implementation against the real kernels, autograd registration, AOT dispatch with dynamic
shapes), and a compiled GPT-2 (aot_eager, Triton's interpreter) whose attention runs the kernels in every layer,
forward and backward, without breaking the graph more often than the stock model, with the chunked engine's loss and
gradients. Before the ops, Dynamo traced into the kernel launch and failed inside Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from hf_neural_attention import dispatch, triton_attention, triton_kernels
from hf_neural_attention.masks import split_attention_mask
from hf_neural_attention.registry import build_variant
from hf_neural_attention.runtime import fast_paths
from conftest import ALL_BUILDERS, VOCAB, converted, tiny_gpt2
from test_fast_path_meaning import dynamo_breaks
from test_triton_kernels import CHUNKED, TRITON, D, H, launches, neural_variant

assert triton_kernels.interpreted(), "conftest must set TRITON_INTERPRET=1 before triton is imported"
pytestmark = pytest.mark.triton

B, L = 1, 9  # H and D: test_triton_kernels', which neural_variant builds for
CASES = {
    "expressive": ("expressive", {"form": "rational", "scale": True}, 0.0),
    "neural-relu-add": ("neural", {"combine": "add", "proj_dim": 2, "hidden_dims": [3, 2]}, 0.0),
    "neural-per-head-dropout": ("neural", {"per_head": True, "proj_dim": 2, "hidden_dims": [3, 2]}, 0.2),
}


def op_arguments(name: str, monkeypatch) -> tuple:
    """The forward op's arguments as triton_attention_output builds them (padding mask with a fully masked row,
    and dropout where the case has it), every float tensor a leaf that requires a gradient."""
    kind, options, dropout = CASES[name]
    variant = neural_variant(options) if kind == "neural" else build_variant(kind, H, D, **options)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=generator) for _ in range(3))
    keep = torch.rand(B, 1, L, L, generator=generator) < 0.7
    keep[..., -1] = True
    keep[0, :, 0] = False
    mask = split_attention_mask(keep, L, L, False, q.device)
    captured = []
    monkeypatch.setattr(triton_attention, "fused_attention", lambda *args: captured.append(args) or v)
    triton_attention.triton_attention_output(variant.kernel_inputs(q, k, mask, D**-0.5), v, mask, dropout,
                                             torch.tensor(1234) if dropout else None)
    monkeypatch.undo()
    call, *tensors = captured[0]
    q, k, v, *mlp = (t.detach().clone().requires_grad_() for t in tensors)
    return (q, k, v, mlp, *triton_attention._op_arguments(call))


@pytest.mark.parametrize("name", list(CASES))
def test_the_forward_op_passes_opcheck(name, monkeypatch):
    """Schema, fake implementation (shapes, dtypes, strides of all three outputs) against the kernels, the
    registered autograd, and AOT autograd with dynamic shapes (which runs the backward op through autograd too)."""
    torch.library.opcheck(triton_attention._fused_forward, op_arguments(name, monkeypatch))


@pytest.mark.parametrize("name", list(CASES))
def test_the_backward_op_passes_opcheck(name, monkeypatch):
    """The backward op is differentiated by nobody (no double backward), so no autograd registration is checked."""
    q, k, v, mlp, *call = op_arguments(name, monkeypatch)
    q, k, v, *mlp = (t.detach() for t in (q, k, v, *mlp))
    out, row_max, row_sum = triton_attention._fused_forward(q, k, v, mlp, *call)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    args = (grad_output, q, k, v, mlp, out, row_max, row_sum, *call)
    grads = triton_attention._fused_backward(*args)
    assert [g.shape for g in grads[2:]] == [t.shape for t in (v, *mlp)]
    torch.library.opcheck(triton_attention._fused_backward, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_the_op_gives_every_input_its_gradient_and_the_chunked_engines(monkeypatch):
    """Through the op's registered autograd: q, k, v and all of neural's parameters (the kernel inputs' down
    projections, hidden and output weights and biases) get the chunked engine's gradients."""
    variant = neural_variant({"combine": "add", "proj_dim": 2, "hidden_dims": [3, 2]})
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 19, D, generator=generator) for _ in range(3))
    mask = split_attention_mask(None, 19, 19, True, q.device)
    grad_output = torch.randn(q.shape, generator=generator)
    settings = launches(monkeypatch)
    results = []
    for engine in (TRITON, CHUNKED):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with fast_paths(True, **engine):
            output, _ = dispatch.attention(variant, *leaves, mask, D**-0.5, 0.0)
        results.append((output, torch.autograd.grad(output, [*leaves, *variant.parameters()], grad_output)))
    assert len(settings) == 2, "one forward and one backward launch"
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    last_bias = 3 + [name for name, _ in variant.named_parameters()].index("mlp_biases.2")
    for index, (fused, chunked) in enumerate(zip(results[0][1], results[1][1])):
        if index == last_bias:  # a constant added to every score: the softmax cancels it, so its gradient is 0
            assert not fused.any()
        else:
            assert fused.abs().max() > 0, f"gradient {index} is zero"
        torch.testing.assert_close(fused, chunked, rtol=0, atol=1e-4, msg=f"gradient {index}")


@pytest.mark.slow  # a compiled model through Triton's interpreter
@pytest.mark.parametrize("variant,padded", [("expressive", False), ("neural", True)],
                         ids=["expressive-causal", "neural-padded"])
def test_a_compiled_gpt2_runs_the_kernels_in_its_graph(variant, padded, monkeypatch):
    """torch.compile (aot_eager) of a converted 2-layer GPT-2 training step with the kernels forced: the graph breaks
    no more often than the stock SDPA model's (once, in Transformers' code, as in test_fast_path_meaning), the
    kernels run in both layers forward and backward (causal pattern computed in the kernels, or a padding mask read
    as bytes), and loss and gradients equal the chunked engine's in eager."""
    ids = torch.randint(1, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    attention_mask = None  # the causal pattern alone (Transformers hands no mask, is_causal)
    if padded:
        attention_mask = torch.ones(ids.shape, dtype=torch.long)
        attention_mask[1, :4] = 0  # left padding
    stock_breaks = dynamo_breaks(tiny_gpt2().train(), ids)
    model = converted(ALL_BUILDERS["gpt2"], variant).train()
    with fast_paths(True, backend="triton"):
        assert dynamo_breaks(model, ids) <= stock_breaks
    results = {}
    for name, settings in (("compiled", TRITON), ("chunked", CHUNKED)):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        forward = torch.compile(model, backend="aot_eager") if name == "compiled" else model
        launched = launches(monkeypatch)
        with fast_paths(True, **settings):
            loss = forward(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
            loss.backward()
        monkeypatch.undo()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert len(launched) == (4 if name == "compiled" else 0), "two layers, forward and backward, in the kernels"
        assert all(s["CAUSAL"] != padded and s["HAS_KEEP"] == padded for s in launched)
    torch._dynamo.reset()
    torch.testing.assert_close(results["compiled"][0], results["chunked"][0], rtol=0, atol=1e-5)
    assert results["compiled"][1].keys() == results["chunked"][1].keys()
    for name, grad in results["chunked"][1].items():
        torch.testing.assert_close(results["compiled"][1][name], grad, rtol=0, atol=1e-4, msg=name)
