"""bf16/fp16 autocast (what TrainingArguments' bf16/fp16 turn on) and torch.compile give every variant the fp32
numbers within a stated tolerance, on the plain and the chunked paths, with gradient checkpointing: the README's
"work with every variant" is a closeness claim, not only a finite loss (the Trainer runs in
test_trainer_and_recipes.py check the plumbing).

Tolerances (relative L2 error against fp32, measured worst case in brackets, tiny GPT-2, 2 layers, d_h 16):
logits bf16 1e-2 [4.3e-3], fp16 2e-3 [5.1e-4]; all gradients bf16 3e-2 [1.1e-2, expressive; dot 4.8e-3], fp16
3e-3 [1.0e-3]; torch.compile (aot_eager) 1e-5 [0]. Measured on an Intel Xeon with AVX512-BF16, torch 2.13 (CPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import hf_neural_attention as hfna
from conftest import RICH_OPTIONS, VOCAB, perturb_added_parameters, tiny_gpt2

TOLERANCE = {torch.bfloat16: {"logits": 1e-2, "gradients": 3e-2}, torch.float16: {"logits": 2e-3, "gradients": 3e-3}}
PATHS = {"plain": lambda: hfna.fast_paths(False), "chunked": lambda: hfna.fast_paths(True, min_size=0, chunk_size=8)}


def model_for(variant: str):
    torch.manual_seed(0)
    model = hfna.convert(tiny_gpt2(), variant, layers="all", **RICH_OPTIONS[variant])
    perturb_added_parameters(model)  # zero-initialised parts would make every variant look like dot
    return model.train()


def run(model, ids, dtype=None, compiled=False):
    model.zero_grad()
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    with torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext():
        output = forward(input_ids=ids, labels=ids)
    output.loss.backward()
    gradients = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return output.logits.detach().float(), gradients.clone()


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_half_precision_autocast_with_checkpointing_is_close_to_fp32(variant, path):
    model = model_for(variant)
    ids = torch.randint(1, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with PATHS[path]():
        logits, gradients = run(model, ids)
        model.gradient_checkpointing_enable()
        for dtype, tolerance in TOLERANCE.items():
            half_logits, half_gradients = run(model, ids, dtype)
            assert relative(half_logits, logits) < tolerance["logits"], (dtype, relative(half_logits, logits))
            assert relative(half_gradients, gradients) < tolerance["gradients"], \
                (dtype, relative(half_gradients, gradients))


@pytest.mark.slow
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_compiled_model_equals_the_eager_model(variant):
    """The aot_eager backend (dynamo + AOT autograd, what test_trainer_and_recipes runs for every variant)."""
    torch._dynamo.reset()
    model = model_for(variant)
    ids = torch.randint(1, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with PATHS["plain"]():
        logits, gradients = run(model, ids)
        compiled_logits, compiled_gradients = run(model, ids, compiled=True)
    assert relative(compiled_logits, logits) < 1e-5 and relative(compiled_gradients, gradients) < 1e-5
