"""How the Auto classes find the variant classes: through Transformers' public `register`, with nothing private touched
at import; a variant config registers its architecture's heads (a generic head's AutoModel.from_config then builds the
variant base model); `register_architecture` names one architecture; the opt-in `find_every_architecture` answers for
all; and the Transformers internals the package reads are checked here, with a message saying what changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_neural_attention as hfna
from hf_neural_attention.modeling_variants import auto_classes, stock_classes_by_auto_class

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=50, pad_token_id=0)
CHANGED = (f"Transformers {transformers.__version__} changed an internal the package reads; update "
           "modeling_variants.stock_classes_by_auto_class / auto_registration.find_every_architecture")


def test_the_auto_class_tables_the_package_reads_are_there():
    """stock_classes_by_auto_class reads each Auto class's `_model_mapping` (Transformers keeps no public list of the
    Auto classes serving a config class): a mapping from config classes to model classes."""
    autos = auto_classes()
    assert {"AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
            "AutoModelForImageClassification"} <= set(autos), CHANGED
    mapping = getattr(AutoModelForCausalLM, "_model_mapping", None)
    assert mapping is not None and transformers.LlamaConfig in mapping, CHANGED
    assert mapping[transformers.LlamaConfig] is transformers.LlamaForCausalLM, CHANGED
    served = stock_classes_by_auto_class(transformers.Qwen2Config)
    assert served["AutoModel"] is transformers.Qwen2Model, CHANGED
    assert served["AutoModelForSequenceClassification"] is transformers.Qwen2ForSequenceClassification, CHANGED


def test_the_config_table_the_opt_in_swaps_is_a_dict_the_mapping_consults(monkeypatch):
    """find_every_architecture swaps CONFIG_MAPPING._extra_content, which must be a dict that `in` and `[]` consult."""
    extras = getattr(CONFIG_MAPPING, "_extra_content", None)
    assert type(extras) is dict, CHANGED
    marker = type("MarkerConfig", (), {})
    monkeypatch.setattr(CONFIG_MAPPING, "_extra_content", {**extras, "hfna_marker": marker})
    assert "hfna_marker" in CONFIG_MAPPING and CONFIG_MAPPING["hfna_marker"] is marker, CHANGED


def test_find_every_architecture_finds_an_architecture_never_named(monkeypatch):
    monkeypatch.setattr(CONFIG_MAPPING, "_extra_content", dict(CONFIG_MAPPING._extra_content))  # restored after
    assert "variant_olmo" not in CONFIG_MAPPING
    hfna.find_every_architecture()
    assert "variant_olmo" in CONFIG_MAPPING and "variant_no_such_model" not in CONFIG_MAPPING
    config = AutoConfig.for_model("variant_olmo", **TINY, attention_variant="cdape")
    assert type(config).__name__ == "VariantOlmoConfig"
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "VariantOlmoForCausalLM" and model.config.attention_variant == "cdape"


def test_the_opt_in_refuses_clearly_where_the_table_changed(monkeypatch):
    monkeypatch.setattr(CONFIG_MAPPING, "_extra_content", None)
    with pytest.raises(RuntimeError, match=r"register_architecture\('<model type>'\) .* trust_remote_code=True"):
        hfna.find_every_architecture()


def test_register_architecture_names_one_and_a_generic_head_builds_the_variant_base_model():
    config_class = hfna.register_architecture("qwen2")
    assert AutoConfig.for_model("variant_qwen2").__class__ is config_class
    head = AutoModelForSequenceClassification.from_config(config_class(**TINY, attention_variant="neural"))
    assert type(head).__name__ == "VariantQwen2ForSequenceClassification"
    assert type(head.model).__name__ == "VariantQwen2Model"  # built by AutoModel.from_config inside the stock head
    assert len([name for name, _ in head.named_parameters() if ".attention_variant." in name]) > 0


def test_creating_a_variant_config_registers_its_heads():
    config = hfna.variant_config_class(transformers.PhiConfig)(**TINY, attention_variant="expressive")
    assert type(AutoModel.from_config(config)).__name__ == "VariantPhiModel"
    assert type(AutoModelForCausalLM.from_config(config)).__name__ == "VariantPhiForCausalLM"


# Imports the package in a fresh process whose Auto tables record every lookup, and reports what the import did.
IMPORT_WATCHER = textwrap.dedent(
    """
    import json
    from transformers.models.auto import configuration_auto, modeling_auto

    reads = []

    class Watched(type(modeling_auto.AutoModel._model_mapping)):
        def __contains__(self, key):
            reads.append(str(key))
            return super().__contains__(key)

        def __getitem__(self, key):
            reads.append(str(key))
            return super().__getitem__(key)

    for auto in vars(modeling_auto).values():
        mapping = getattr(auto, "_model_mapping", None) if isinstance(auto, type) else None
        if mapping is not None:
            mapping.__class__ = Watched
    import hf_neural_attention

    extras = configuration_auto.CONFIG_MAPPING._extra_content
    model_extras = [type(getattr(auto, "_model_mapping")._extra_content).__name__
                    for auto in vars(modeling_auto).values()
                    if isinstance(auto, type) and getattr(auto, "_model_mapping", None) is not None]
    print("REPORT" + json.dumps({"reads": reads, "config_extras": [type(extras).__name__, sorted(extras)],
                                 "model_extras": sorted(set(model_extras))}))
    """
)


@pytest.mark.slow
def test_importing_the_package_reads_no_auto_table_and_patches_nothing(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", IMPORT_WATCHER], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    assert report["reads"] == []  # no Auto model table is consulted at import
    assert report["config_extras"] == ["dict", ["variant_gpt2", "variant_llama", "variant_vit"]]  # public register
    assert report["model_extras"] == ["dict"]
