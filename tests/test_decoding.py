"""Causality, KV-cache decoding and left padding for the causal architectures, with every added parameter moved away
from its init so zero-initialised parts cannot hide a leak."""

from __future__ import annotations

import pytest
import torch

import hf_neural_attention as hfna
from conftest import CAUSAL_BUILDERS, VOCAB, converted

ARCHS = list(CAUSAL_BUILDERS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_changing_a_token_leaves_earlier_logits_unchanged(arch, variant):
    model = converted(CAUSAL_BUILDERS[arch], variant)
    ids = torch.randint(1, VOCAB, (2, 16))
    changed = ids.clone()
    t = 9
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-5)
    assert (before[:, t:] - after[:, t:]).abs().max() > 1e-4, "the change should reach later positions"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_cached_decoding_equals_full_forward(arch, variant):
    model = converted(CAUSAL_BUILDERS[arch], variant)
    ids = torch.randint(1, VOCAB, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        prefill = model(ids[:, :10], use_cache=True)
        cache = prefill.past_key_values
        steps = []
        for position in range(10, 14):  # one cached step at a time
            out = model(ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(prefill.logits, full[:, :10], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 10:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_greedy_generate_same_with_and_without_cache(arch, variant):
    model = converted(CAUSAL_BUILDERS[arch], variant)
    prompt = torch.randint(1, VOCAB, (2, 6))
    settings = dict(max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)


def padded_batch(pad: int = 3, length: int = 9):
    row = torch.randint(1, VOCAB, (1, length))
    other = torch.randint(1, VOCAB, (1, length + pad))
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), row], dim=1), other])
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :pad] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return row, ids, attention_mask, position_ids


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_left_padded_row_equals_row_alone(arch, variant):
    model = converted(CAUSAL_BUILDERS[arch], variant)
    row, ids, attention_mask, position_ids = padded_batch()
    with torch.no_grad():
        alone = model(row).logits
        batched = model(ids, attention_mask=attention_mask, position_ids=position_ids).logits
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[:1, 3:], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["neural", "cdape"])
def test_left_padded_cached_generation_equals_row_alone(arch, variant):
    """generate() on a left-padded batch (cache, padding mask and positions from generate itself)."""
    model = converted(CAUSAL_BUILDERS[arch], variant)
    row, ids, attention_mask, _ = padded_batch()
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        alone = model.generate(row, **settings)
        batched = model.generate(ids, attention_mask=attention_mask, **settings)
    assert torch.equal(batched[0, 3:], alone[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_untouched_layers_keep_stock_attention_in_decoding(arch):
    """neural defaults to the first layer only; the second keeps SDPA, with the variant's boolean mask."""
    model = converted(CAUSAL_BUILDERS[arch], "neural", layers=None)
    assert model.config.attention_variant_layers == [0]
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        prefill = model(ids[:, :11], use_cache=True)
        step = model(ids[:, 11:], past_key_values=prefill.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 11:], rtol=0, atol=1e-5)


def test_neural_warns_on_left_padding_without_position_ids(caplog):
    """neural's learned score is not shift-invariant: a left-padded batch without position_ids differs from the rows
    alone, so the model says so (once); with position_ids, and for shift-invariant variants, it stays quiet."""
    from hf_neural_attention import injection

    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    for variant, warns in (("cdape", False), ("neural", True)):
        injection._LEFT_PADDING_WARNED.clear()
        model = converted(CAUSAL_BUILDERS["llama"], variant)
        with caplog.at_level("WARNING", logger="hf_neural_attention.injection"):
            caplog.clear()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=attention_mask, position_ids=positions)
            assert not caplog.records
            with torch.no_grad():
                model(input_ids=ids, attention_mask=attention_mask)
            assert bool(caplog.records) == warns, variant
            if warns:
                assert "position_ids" in caplog.records[0].getMessage()
        hfna.revert(model)
        caplog.clear()
        injection._LEFT_PADDING_WARNED.clear()
        with caplog.at_level("WARNING", logger="hf_neural_attention.injection"), torch.no_grad():
            model(input_ids=ids, attention_mask=attention_mask)
        assert not caplog.records, "revert removes the hook"
