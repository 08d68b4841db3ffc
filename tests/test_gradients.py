"""Gradients reach every added parameter, gradient checkpointing gives the same gradients, bf16 stays finite."""

from __future__ import annotations

import pytest
import torch

import hf_neural_attention as hfna
from conftest import ALL_BUILDERS, VOCAB, added_parameters, converted

ARCHS = list(ALL_BUILDERS)
PARAMETRIC = [v for v in hfna.VARIANTS if v not in ("dot", "expressive")]
SOFTMAX_CANCELS = ("attention_variant.mlp_biases.2",)  # neural's last bias (the paper's widths: three layers)


def loss_of(model, arch: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    if arch == "vit":
        pixels = torch.randn(3, 3, 16, 16, generator=generator, dtype=next(model.parameters()).dtype)
        return model(pixel_values=pixels, labels=torch.tensor([0, 3, 4])).loss
    ids = torch.randint(1, VOCAB, (3, 12), generator=generator)
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", PARAMETRIC)
def test_gradients_reach_every_added_parameter(arch, variant):
    model = converted(ALL_BUILDERS[arch], variant).train()
    loss_of(model, arch).backward()
    params = added_parameters(model)
    assert params
    for name, parameter in params.items():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        if name.endswith(SOFTMAX_CANCELS):  # a constant added to every score: its true gradient is 0
            assert parameter.grad.abs().max() < 1e-6, name
            continue
        assert parameter.grad.abs().sum() > 0, f"no gradient signal reaches {name}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_gradient_checkpointing_gives_same_gradients(arch, variant):
    reference = converted(ALL_BUILDERS[arch], variant).train()
    loss_of(reference, arch).backward()
    checkpointed = converted(ALL_BUILDERS[arch], variant).train()
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.is_activation_checkpointing
    loss_of(checkpointed, arch).backward()
    expected = dict(reference.named_parameters())
    for name, parameter in checkpointed.named_parameters():
        if expected[name].grad is None:
            assert parameter.grad is None, name
            continue
        torch.testing.assert_close(parameter.grad, expected[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_bf16_forward_and_backward_are_finite(arch, variant):
    model = converted(ALL_BUILDERS[arch], variant).to(torch.bfloat16).train()
    for parameter in added_parameters(model).values():
        assert parameter.dtype == torch.bfloat16
    loss = loss_of(model, arch)
    assert loss.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(loss)
    loss.backward()
    for name, parameter in added_parameters(model).items():
        assert torch.isfinite(parameter.grad.float()).all(), name


@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_attention_dropout_is_applied_in_training(variant):
    model = converted(ALL_BUILDERS["llama"], variant)
    model.config.attention_dropout = 0.5
    for _, module in hfna.find_attention_modules(model):
        module.attention_dropout = 0.5
    ids = torch.randint(1, VOCAB, (2, 10))
    with torch.no_grad():
        evaluation = model(ids).logits
        model.train()
        torch.manual_seed(1)
        first = model(ids).logits
        torch.manual_seed(2)
        second = model(ids).logits
    assert (first - second).abs().max() > 1e-4 and (first - evaluation).abs().max() > 1e-4
