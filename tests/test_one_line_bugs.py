"""Tests written to catch three plausible one-line bugs that the other tests let through (issue 26 item 11):

(a) None accepted for every option: `form: null` in a recipe reaches the variant as form=None, which the score rule
    would silently run as another form. None passes only for options whose default is None (derived from the
    geometry); for every other option it is refused, naming the option (and the choices, for a choice).
(b) ALiBi slopes for head counts that are not a power of two: the interleave takes the even-indexed slopes of the
    next power of two (Press et al.), so GPT-2's 12 heads end with 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5, not 2^-1, 2^-2, ...
(c) The resume check comparing the variant options: a cdape alibi checkpoint resumed with a kerple recipe.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import hf_neural_attention as hfna
from conftest import VOCAB, tiny_gpt2
from hf_neural_attention.cdape import alibi_slopes
from hf_neural_attention.experiments.recipes import DataArguments, ModelArguments, validate_arguments
from hf_neural_attention.experiments.resume import check_resume

# ---- (a) None for an option whose default is not None ------------------------------------------------------------

NOT_NONE_OPTIONS = [(variant, option) for variant in hfna.VARIANTS
                    for option, spec in hfna.VARIANT_CLASSES[variant].options_spec.items() if spec.default is not None]


def test_every_variant_has_options_that_must_not_be_none():
    assert {variant for variant, _ in NOT_NONE_OPTIONS} == {"expressive", "neural", "cdape"}
    assert ("expressive", "form") in NOT_NONE_OPTIONS and ("cdape", "bias") in NOT_NONE_OPTIONS


@pytest.mark.parametrize("variant,option", NOT_NONE_OPTIONS)
def test_none_is_refused_for_an_option_with_a_default(variant, option):
    spec = hfna.VARIANT_CLASSES[variant].options_spec[option]
    with pytest.raises(ValueError) as raised:
        hfna.validate_variant_options(variant, {option: None})
    message = str(raised.value)
    assert option in message and "None" in message, message
    choices = getattr(spec.check, "__closure__", None)
    if choices:  # a choice(...): every valid value is named
        for choice in choices[0].cell_contents:
            assert repr(choice) in message, message
    with pytest.raises(ValueError, match=option):
        hfna.convert(tiny_gpt2(), variant, **{option: None})


@pytest.mark.parametrize("variant,option", [(v, o) for v in hfna.VARIANTS
                                            for o, s in hfna.VARIANT_CLASSES[v].options_spec.items()
                                            if s.default is None])
def test_none_still_means_derived_for_options_whose_default_is_none(variant, option):
    assert hfna.validate_variant_options(variant, {option: None}) == {option: None}


def test_form_null_in_a_recipe_is_refused_naming_the_choices():
    options = yaml.safe_load("attention_options: {form: null}")["attention_options"]
    assert options == {"form": None}
    with pytest.raises(ValueError) as raised:
        validate_arguments(ModelArguments(attention_variant="expressive", attention_options=options), DataArguments())
    message = str(raised.value)
    assert "form=None" in message and "'rational'" in message and "'softmax_square'" in message, message


# ---- (b) ALiBi slopes ---------------------------------------------------------------------------------------------

def paper_slopes(num_heads: int) -> list[float]:
    """ALiBi's slopes restated in float64: 2^(-8 i / n) for n a power of two; otherwise those of the largest power
    of two p below n, then the odd-numbered slopes 2^(-8 i / 2p), i = 1, 3, 5, ..., of 2p heads."""
    p = 2 ** int(torch.log2(torch.tensor(float(num_heads))).floor())
    first = [2.0 ** (-8.0 * i / p) for i in range(1, p + 1)]
    rest = [2.0 ** (-8.0 * i / (2 * p)) for i in range(1, 2 * (num_heads - p), 2)]
    return first + rest


@pytest.mark.parametrize("num_heads", [6, 12, 2, 4, 8, 16])
def test_alibi_slopes_follow_the_paper(num_heads):
    expected = torch.tensor(paper_slopes(num_heads), dtype=torch.float64)
    got = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert len(set(alibi_slopes(num_heads))) == num_heads  # no head shares another's slope


def test_gpt2_heads_9_to_12_get_the_interleaved_slopes():
    slopes = alibi_slopes(12)
    torch.testing.assert_close(torch.tensor(slopes[8:], dtype=torch.float64),
                               torch.tensor([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5], dtype=torch.float64))
    assert [round(s, 3) for s in slopes[8:]] == [0.707, 0.354, 0.177, 0.088]
    six = alibi_slopes(6)
    assert [round(s, 4) for s in six] == [0.25, 0.0625, 0.0156, 0.0039, 0.5, 0.125]


def test_a_12_head_cdape_model_uses_those_slopes():
    config = GPT2Config(n_layer=1, n_embd=48, n_head=12, n_positions=32, vocab_size=VOCAB)
    model = hfna.convert(GPT2LMHeadModel(config), "cdape", bias="alibi")
    variant = model.transformer.h[0].attn.attention_variant
    assert tuple(variant.alibi_slopes) == pytest.approx(tuple(paper_slopes(12)), rel=1e-12)


# ---- (c) the resume check compares the variant options -----------------------------------------------------------

def test_resuming_a_cdape_alibi_checkpoint_with_a_kerple_recipe_is_refused(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-3"
    hfna.convert(tiny_gpt2(), "cdape", bias="alibi").config.save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), resume_from_checkpoint=str(checkpoint),
                                  report_to="none", use_cpu=True)
    kerple = hfna.convert(tiny_gpt2(), "cdape", bias="kerple")
    with pytest.raises(ValueError) as raised:
        check_resume(arguments, kerple)
    message = str(raised.value)
    assert "attention_variant_options" in message and "'alibi'" in message and "'kerple'" in message, message
    assert "attention_variant:" not in message  # the variant itself is the same: only the options differ
    alibi = hfna.convert(tiny_gpt2(), "cdape", bias="alibi")
    assert check_resume(arguments, alibi) == 3  # the same recipe resumes
