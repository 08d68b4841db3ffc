"""The neural scorer's dead unit: the weight certificate, that it really means uniform attention, the Trainer callback
that warns, and the documented remedy (activation="leaky_relu") on both paths and through a checkpoint."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

import hf_neural_attention as hfna
from hf_neural_attention import dispatch
from hf_neural_attention.experiments.harness import training_arguments
from hf_neural_attention.experiments.scorer_health import NeuralScorerMonitor, dead_groups, dead_scorers
from hf_neural_attention.experiments.training import train_model
from hf_neural_attention.masks import split_attention_mask
from hf_neural_attention.registry import build_variant
from hf_neural_attention.runtime import fast_paths
from conftest import VOCAB, tiny_gpt2

H, D = 2, 64  # d_h 64: the paper's widths 4 -> 2 -> 1 -> 1, a single unit before the output


@torch.no_grad()
def kill_last_hidden_unit(scorer) -> None:
    scorer.mlp_weights[1].copy_(-scorer.mlp_weights[1].abs())
    scorer.mlp_biases[1].copy_(-scorer.mlp_biases[1].abs() - 0.1)


def weights_of(scorer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, H, 9, D, generator=generator) for _ in range(2))
    mask = split_attention_mask(None, 9, 9, True, q.device)
    return scorer.attention_weights(q, k, mask, D**-0.5), mask.keep


def test_the_certificate_means_uniform_attention_and_leaky_relu_avoids_it():
    torch.manual_seed(0)
    scorer = build_variant("neural", H, D)
    assert scorer.hidden_dims == [2, 1]
    weights, keep = weights_of(scorer)
    uniform = keep / keep.sum(-1, keepdim=True)
    if not dead_groups(scorer):
        assert (weights - uniform).abs().max() > 1e-3  # alive: the scores depend on q and k
    kill_last_hidden_unit(scorer)
    assert dead_groups(scorer) == [0]
    weights, _ = weights_of(scorer)
    torch.testing.assert_close(weights, uniform.expand_as(weights).float(), rtol=0, atol=1e-7)
    leaky = build_variant("neural", H, D, activation="leaky_relu")
    leaky.load_state_dict(scorer.state_dict())  # the same dead weights
    assert dead_groups(leaky) == []
    weights, _ = weights_of(leaky)
    assert (weights - uniform).abs().max() > 1e-6  # still depends on the inputs, if weakly


def test_per_head_scorers_report_their_dead_heads():
    torch.manual_seed(0)
    scorer = build_variant("neural", H, D, per_head=True)
    with torch.no_grad():
        scorer.mlp_weights[1][1].fill_(-1.0)
        scorer.mlp_biases[1][1].fill_(-1.0)
        scorer.mlp_weights[1][0].fill_(1.0)
    assert dead_groups(scorer) == [1]


def test_the_monitor_warns_once_per_dead_layer(caplog):
    model = hfna.convert(tiny_gpt2(), "neural", layers="all")
    monitor = NeuralScorerMonitor(check_every=1)
    state = SimpleNamespace(global_step=0)
    with caplog.at_level(logging.WARNING):
        monitor.on_train_begin(None, state, None, model=model)
    dead_at_start = set(dead_scorers(model))  # reported by on_train_begin already
    for block in model.transformer.h:
        with torch.no_grad():
            block.attn.attention_variant.mlp_weights[1].fill_(-0.5)
            block.attn.attention_variant.mlp_biases[1].fill_(-0.5)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        state.global_step = 7
        monitor.on_step_end(None, state, None, model=model)
        monitor.on_step_end(None, state, None, model=model)
    warnings = [r.getMessage() for r in caplog.records if "no longer depends on its inputs" in r.getMessage()]
    assert len(warnings) == 2 - len(dead_at_start)
    assert all("step 7" in w and "leaky_relu" in w for w in warnings)
    with pytest.raises(ValueError, match="check_every must be an integer >= 1"):
        NeuralScorerMonitor(check_every=0)


@pytest.mark.slow
def test_training_a_neural_model_runs_the_monitor(tmp_path):
    model = hfna.convert(tiny_gpt2(), "neural")
    ids = torch.randint(1, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trainer, _, _ = train_model(model, training_arguments(tmp_path, seed=0, max_steps=1, per_device_train_batch_size=4),
                                dataset)
    assert any(isinstance(c, NeuralScorerMonitor) for c in trainer.callback_handler.callbacks)


def leaky_reference(scorer, q, k, keep):
    """float64 formula with the leaky activation: the pair MLP on cat(q~, k~), softmax over visible keys."""
    q_small = q @ scorer.query_down_weight[0].T + scorer.query_down_bias[0]
    k_small = k @ scorer.key_down_weight[0].T + scorer.key_down_bias[0]
    x = torch.cat([q_small[..., :, None, :].expand(-1, -1, -1, k.shape[2], -1),
                   k_small[..., None, :, :].expand(-1, -1, q.shape[2], -1, -1)], dim=-1)
    for index, (w, b) in enumerate(zip(scorer.mlp_weights, scorer.mlp_biases)):
        x = x @ w[0].T + b[0]
        x = torch.where(x > 0, x, 0.01 * x) if index < len(scorer.mlp_weights) - 1 else x
    return torch.softmax(x[..., 0].masked_fill(~keep, float("-inf")), dim=-1)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "chunked"])
def test_leaky_relu_matches_its_formula_on_both_paths(fast):
    torch.manual_seed(0)
    scorer = build_variant("neural", H, D, activation="leaky_relu")
    kill_last_hidden_unit(scorer)  # the negative side is where leaky and relu differ
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, H, 11, D, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mask = split_attention_mask(None, 11, 11, True, q.device)
    double = build_variant("neural", H, D, activation="leaky_relu").double()
    double.load_state_dict(scorer.state_dict())
    expected = leaky_reference(double, q, k, mask.keep) @ v
    with fast_paths(fast, min_size=0, chunk_size=4):
        output, _ = dispatch.attention(double, q, k, v, mask, D**-0.5, 0.0)
    torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-10)
    grads = torch.autograd.grad(output.sum(), [q, k])
    expected_grads = torch.autograd.grad(expected.sum(), [q, k])
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-8, atol=1e-10)


def test_the_activation_option_round_trips_and_is_validated(tmp_path):
    model = hfna.convert(tiny_gpt2(), "neural", activation="leaky_relu")
    model.save_pretrained(tmp_path)
    loaded = hfna.VariantGPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.attention_variant_options["activation"] == "leaky_relu"
    assert loaded.transformer.h[0].attn.attention_variant.activation == "leaky_relu"
    with pytest.raises(ValueError, match=r"activation='gelu' is not valid; choose one of \['relu', 'leaky_relu'\]"):
        hfna.convert(tiny_gpt2(), "neural", activation="gelu")


# ---- dead on the data: the weights certify nothing, the inputs the model produces never revive it ------------------

@torch.no_grad()
def dead_on_the_data(scorer) -> None:
    """A first hidden layer dead for every input of ordinary size (bias -100; the projected q and k are O(1)) but
    alive where |q~| or |k~| is large, and later layers with a positive weight, so no layer is certified dead."""
    scorer.mlp_biases[0].fill_(-100.0)
    for weight, bias in zip(scorer.mlp_weights[1:-1], scorer.mlp_biases[1:-1]):
        weight.fill_(1.0)
        bias.fill_(-0.5)


def test_a_scorer_dead_on_the_data_but_not_by_its_weights_is_found_by_the_probe():
    from hf_neural_attention.experiments.scorer_health import constant_on_data

    torch.manual_seed(0)
    scorer = build_variant("neural", H, D, init="alive")
    generator = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, H, 40, D, generator=generator) for _ in range(2))
    assert constant_on_data(scorer, q, k, D**-0.5) == []  # alive at init on these inputs
    dead_on_the_data(scorer)
    assert dead_groups(scorer) == []  # the weight certificate sees nothing
    assert constant_on_data(scorer, q, k, D**-0.5) == [0, 1]  # every pair of the data scores the same
    assert constant_on_data(scorer, 1e4 * q, 1e4 * k, D**-0.5) != [0, 1]  # large inputs revive it: not a certificate
    add = build_variant("neural", H, D, combine="add")
    dead_on_the_data(add)
    with torch.no_grad():
        add.mlp_weights[-1].fill_(0.3)  # a live last layer: the MLP would matter if its hidden units were alive
    assert constant_on_data(add, q, k, D**-0.5) == [0, 1]  # attention = plain q.k attention


def train_one_step(model, tmp_path):
    ids = torch.randint(1, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    return train_model(model, training_arguments(tmp_path, seed=0, max_steps=1, per_device_train_batch_size=4),
                       dataset)[0]


@pytest.mark.parametrize("dead", [True, False], ids=["dead_on_the_data", "alive"])
def test_the_monitor_warns_once_for_a_scorer_dead_on_the_data(dead, tmp_path, caplog):
    torch.manual_seed(0)
    model = hfna.convert(tiny_gpt2(), "neural", init="alive")  # layer 0, as the paper
    scorer = model.transformer.h[0].attn.attention_variant
    if dead:
        dead_on_the_data(scorer)
    assert dead_scorers(model) == {}
    with caplog.at_level(logging.WARNING, logger="hf_neural_attention.experiments.scorer_health"):
        trainer = train_one_step(model, tmp_path)
        model.eval()
        with torch.no_grad():  # a forward after training: the probe armed at the end of training fires, once
            model(torch.randint(1, VOCAB, (2, 12)))
    warnings = [r.getMessage() for r in caplog.records if "dead on the data" in r.getMessage()]
    if not dead:
        assert warnings == []
        return
    assert len(warnings) == 1, warnings
    assert "transformer.h.0.attn" in warnings[0] and "heads [0, 1, 2, 3]" in warnings[0]
    assert "leaky_relu" in warnings[0] and "init='alive'" in warnings[0] and "uniform" in warnings[0]
    assert "prepare" not in vars(scorer) and "kernel_inputs" not in vars(scorer)  # probes removed
    monitor = next(c for c in trainer.callback_handler.callbacks if isinstance(c, NeuralScorerMonitor))
    assert monitor.probes == {}
