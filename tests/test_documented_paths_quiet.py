"""The documented paths print no warning the project causes (issue 26 item 6): retrofit way 2, loading a stock
checkpoint straight into its variant class, reads the stock config as the variant config's base instead of
Transformers warning that another model type "is not supported"; a really foreign model type still warns."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.utils import logging as hf_logging

import hf_neural_attention as hfna
from conftest import tiny_gpt2, tiny_llama

FOREIGN_TYPE = "to instantiate a model of type"


@pytest.fixture
def transformers_warnings(caplog):
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            yield caplog
    finally:
        hf_logging.disable_propagation()
        hf_logging.set_verbosity(verbosity)


def test_retrofit_way_2_from_a_stock_folder_does_not_warn_about_the_model_type(tmp_path, transformers_warnings):
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(tmp_path / "stock")
    model = hfna.VariantGPT2LMHeadModel.from_pretrained(
        tmp_path / "stock", attention_variant="neural", attention_variant_options={"combine": "add"},
        attention_variant_layers="all")
    assert model.config.model_type == "variant_gpt2" and model.config.attention_variant == "neural"
    assert FOREIGN_TYPE not in transformers_warnings.text
    config = hfna.VariantGPT2Config.from_pretrained(tmp_path / "stock")
    assert type(config) is hfna.VariantGPT2Config and config.attention_variant == "dot"
    assert FOREIGN_TYPE not in transformers_warnings.text


def test_a_foreign_model_type_still_warns(tmp_path, transformers_warnings):
    tiny_llama().save_pretrained(tmp_path / "llama")
    hfna.VariantGPT2Config.from_pretrained(tmp_path / "llama")
    assert "You are using a model of type `llama` to instantiate a model of type `variant_gpt2`" in \
        transformers_warnings.text
