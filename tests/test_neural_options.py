"""neural's init option: "alive" (positive biases after the first hidden layer) is never dead at init where the
reference init often is, changes only those biases, keeps the score formula, and round-trips through a checkpoint."""

from __future__ import annotations

import pytest
import torch

import hf_neural_attention as hfna
from hf_neural_attention.experiments.scorer_health import dead_groups
from hf_neural_attention import dispatch
from hf_neural_attention.masks import split_attention_mask
from hf_neural_attention.registry import build_variant
from hf_neural_attention.runtime import fast_paths
from conftest import tiny_gpt2

H, D = 2, 64  # the paper's widths 4 -> 2 -> 1 -> 1


def test_alive_init_is_never_dead_where_the_reference_init_often_is():
    reference_dead = 0
    for seed in range(64):
        torch.manual_seed(seed)
        reference = build_variant("neural", H, D)
        torch.manual_seed(seed)
        alive = build_variant("neural", H, D, init="alive")
        reference_dead += bool(dead_groups(reference))
        assert dead_groups(alive) == []
        assert (alive.mlp_biases[1] > 0).all()
        # the same draws: only the hidden biases after the first layer differ
        for name, parameter in reference.named_parameters():
            if name != "mlp_biases.1":
                torch.testing.assert_close(parameter, dict(alive.named_parameters())[name], rtol=0, atol=0)
    assert 2 <= reference_dead <= 20  # about 1 in 8: the unit's two weights and its bias all <= 0


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "chunked"])
def test_alive_init_keeps_the_formula_on_both_paths(fast):
    """The option changes the init only: the same weights give the same output as the reference init's module."""
    torch.manual_seed(0)
    alive = build_variant("neural", H, D, init="alive").double()
    reference = build_variant("neural", H, D).double()
    reference.load_state_dict(alive.state_dict())
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, H, 10, D, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = split_attention_mask(None, 10, 10, True, q.device)
    expected = reference.attention_weights(q, k, mask, D**-0.5) @ v
    with fast_paths(fast, min_size=0, chunk_size=4):
        output, _ = dispatch.attention(alive, q, k, v, mask, D**-0.5, 0.0)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)


def test_the_init_option_round_trips_and_is_validated(tmp_path):
    torch.manual_seed(0)
    model = hfna.convert(tiny_gpt2(), "neural", init="alive", activation="leaky_relu")
    model.save_pretrained(tmp_path)
    loaded = hfna.VariantGPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.attention_variant_options["init"] == "alive"
    scorer = loaded.transformer.h[0].attn.attention_variant
    assert (scorer.init, scorer.activation) == ("alive", "leaky_relu")
    torch.testing.assert_close(scorer.mlp_biases[1], model.transformer.h[0].attn.attention_variant.mlp_biases[1])
    with pytest.raises(ValueError, match=r"init='kaiming' is not valid; choose one of \['reference', 'alive'\]"):
        hfna.convert(tiny_gpt2(), "neural", init="kaiming")
