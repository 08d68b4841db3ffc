"""Variant config/model classes, Auto registration, checkpoints that load with trust_remote_code where this package
cannot be imported, round trips, retrofitting three ways, mismatch errors, model cards and the Hub folder."""

from __future__ import annotations

import json
import shutil
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

import hf_neural_attention as hfna
from conftest import load_without_the_package, ALL_BUILDERS, VOCAB, converted, perturb_added_parameters, tiny_gpt2, tiny_llama, tiny_vit

REPO = Path(__file__).resolve().parents[1]
NON_CONTROL = ["expressive", "neural", "cdape"]
AUTO_FOR_ARCH = {"gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM, "vit": AutoModelForImageClassification}
VARIANT_CLASS_FOR_ARCH = {
    "gpt2": hfna.VariantGPT2LMHeadModel,
    "llama": hfna.VariantLlamaForCausalLM,
    "vit": hfna.VariantViTForImageClassification,
}


def example_inputs(arch: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    ids = torch.randint(1, VOCAB, (2, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs_of(model, inputs) -> torch.Tensor:
    """Logits at real positions: a padded query's output is never used (SDPA and eager disagree there)."""
    with torch.no_grad():
        logits = model(**inputs).logits
    if "attention_mask" in inputs:
        return logits[inputs["attention_mask"].bool()]
    return logits


def stock_eager(arch, folder):
    """The stock model computing attention with the same (materialised) math as the variants, so a
    function-preserving retrofit is compared without SDPA's different rounding."""
    return AUTO_FOR_ARCH[arch].from_pretrained(folder, attn_implementation="eager")


# ---- classes and Auto registration -----------------------------------------------------------------------------

def test_config_classes_subclass_stock_and_register_with_auto():
    from transformers import GPT2Config, LlamaConfig, ViTConfig

    for cls, stock, model_type in [(hfna.VariantGPT2Config, GPT2Config, "variant_gpt2"),
                                   (hfna.VariantLlamaConfig, LlamaConfig, "variant_llama"),
                                   (hfna.VariantViTConfig, ViTConfig, "variant_vit")]:
        assert issubclass(cls, stock) and cls.model_type == model_type
        config = AutoConfig.for_model(model_type, attention_variant="cdape")
        assert type(config) is cls and config.attention_variant == "cdape"
    assert AutoModelForCausalLM._model_mapping[hfna.VariantGPT2Config] is hfna.VariantGPT2LMHeadModel
    assert AutoModelForCausalLM._model_mapping[hfna.VariantLlamaConfig] is hfna.VariantLlamaForCausalLM
    assert AutoModel._model_mapping[hfna.VariantViTConfig] is hfna.VariantViTModel
    assert (AutoModelForImageClassification._model_mapping[hfna.VariantViTConfig]
            is hfna.VariantViTForImageClassification)


def test_config_rejects_bad_variant_fields():
    from huggingface_hub.errors import StrictDataclassClassValidationError as ConfigError  # wraps our ValueError

    with pytest.raises((ValueError, ConfigError), match="Unknown attention variant 'sparse'"):
        hfna.VariantGPT2Config(attention_variant="sparse")
    with pytest.raises((ValueError, ConfigError), match=r"Unknown option\(s\) \['kernel'\] for attention variant 'cdape'"):
        hfna.VariantLlamaConfig(attention_variant="cdape", attention_variant_options={"kernel": 3})


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
def test_model_class_applies_variant_in_init(arch):
    config_class = VARIANT_CLASS_FOR_ARCH[arch].config_class
    base_config = ALL_BUILDERS[arch]().config.to_dict()
    base_config.pop("model_type", None)
    config = config_class(**base_config, attention_variant="neural", attention_variant_options={"combine": "add"})
    model = VARIANT_CLASS_FOR_ARCH[arch](config)
    assert model.config._attn_implementation == "neural"
    assert model.config.attention_variant_layers == [0]  # the paper default, resolved
    assert model.config.attention_variant_options["combine"] == "add"
    assert len([n for n, _ in model.named_parameters() if ".attention_variant." in n]) > 0


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
def test_convert_returns_variant_classes(arch):
    model = hfna.convert(ALL_BUILDERS[arch](), "expressive")
    assert type(model) is VARIANT_CLASS_FOR_ARCH[arch]
    assert type(model.config) is VARIANT_CLASS_FOR_ARCH[arch].config_class


# ---- save, load, trust_remote_code ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory):
    """One saved checkpoint per (architecture, non-control variant), with the outputs it must reproduce."""
    root = tmp_path_factory.mktemp("checkpoints")
    cases = []
    for arch in ALL_BUILDERS:
        for variant in NON_CONTROL:
            model = converted(ALL_BUILDERS[arch], variant)
            inputs = example_inputs(arch)
            folder = root / f"{arch}-{variant}"
            model.save_pretrained(folder)
            with torch.no_grad():
                logits = model(**inputs).logits
            save_file({**inputs, "logits": logits}, str(folder / "expected_outputs.safetensors"))
            cases.append((arch, variant, folder, model))
    return cases


def test_checkpoint_folder_contents(saved_checkpoints):
    for arch, variant, folder, model in saved_checkpoints:
        files = {p.name for p in folder.iterdir()}
        assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files), files
        assert {"README.md", "modeling_variants.py", "configuration_variants.py", "attention_interface.py",
                "injection.py", "registry.py", "variant.py", "masks.py", "normalisation.py", "chunked.py",
                f"{variant}.py"} <= files
        assert not {"hub.py", "training.py", "data.py", "metrics.py", "harness.py"} & files  # the library only
        config = json.loads((folder / "config.json").read_text())
        assert config["attention_variant"] == variant
        assert config["attention_variant_options"] == model.config.attention_variant_options
        assert config["auto_map"]["AutoConfig"].startswith("configuration_variants.Variant")
        assert config["auto_map"][AUTO_FOR_ARCH[arch].__name__].startswith("modeling_variants.Variant")
        # what the shipped code may import: tests/test_shipped_code.py


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package(saved_checkpoints, tmp_path):
    jobs = [[str(folder), AUTO_FOR_ARCH[arch].__name__] for arch, _, folder, _ in saved_checkpoints]
    report = load_without_the_package(jobs, tmp_path)
    for arch, variant, folder, _ in saved_checkpoints:
        entry = report[str(folder)]
        assert entry["class"] == VARIANT_CLASS_FOR_ARCH[arch].__name__
        assert entry["module"].startswith("transformers_modules"), entry  # the checkpoint's own code
        assert entry["implementation"] == variant
        assert entry["max_diff"] <= 1e-5, (arch, variant, entry)


def test_round_trip_same_outputs_and_config(saved_checkpoints):
    for arch, variant, folder, model in saved_checkpoints:
        loaded = AUTO_FOR_ARCH[arch].from_pretrained(folder)  # package imported: no trust_remote_code needed
        assert type(loaded) is type(model)
        assert loaded.config._attn_implementation == variant  # re-selected on load
        for field in ("attention_variant", "attention_variant_options", "attention_variant_layers"):
            assert getattr(loaded.config, field) == getattr(model.config, field), field
        expected = load_file(str(folder / "expected_outputs.safetensors"))
        with torch.no_grad():
            logits = loaded(**{name: t for name, t in expected.items() if name != "logits"}).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
        # ... and a second round trip keeps it all
        assert loaded.config.to_dict()["attention_variant_options"] == model.config.attention_variant_options


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
def test_base_models_round_trip_through_auto_model(arch, tmp_path):
    torch.manual_seed(0)
    head = ALL_BUILDERS[arch]()
    base = getattr(head, head.base_model_prefix)
    stock_name = type(base).__name__
    base = hfna.convert(base, "cdape", bias="alibi")
    perturb_added_parameters(base)
    base.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded).__name__ == f"Variant{stock_name}"
    inputs = example_inputs(arch)
    inputs.pop("attention_mask", None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).last_hidden_state, base(**inputs).last_hidden_state,
                                   rtol=0, atol=1e-5)


# ---- retrofitting -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stock_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    folders = {}
    for arch, builder in ALL_BUILDERS.items():
        torch.manual_seed(0)
        builder().save_pretrained(root / arch)
        folders[arch] = root / arch
    return folders


PRESERVING = [("cdape", {}), ("neural", {"combine": "add"})]


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
@pytest.mark.parametrize("variant,options", PRESERVING)
def test_retrofit_with_from_pretrained_preserves_outputs(arch, variant, options, stock_checkpoints):
    stock = stock_eager(arch, stock_checkpoints[arch])
    inputs = example_inputs(arch)
    retrofitted = VARIANT_CLASS_FOR_ARCH[arch].from_pretrained(
        stock_checkpoints[arch], attention_variant=variant, attention_variant_options=options,
        attention_variant_layers="all",
    )
    assert retrofitted.config.attention_variant == variant
    assert retrofitted.config.retrofitted_from == str(stock_checkpoints[arch])
    for name, tensor in stock.state_dict().items():  # stock weights loaded, not re-initialised
        torch.testing.assert_close(retrofitted.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    new = {n: p for n, p in retrofitted.named_parameters() if ".attention_variant." in n}
    assert new and all(torch.isfinite(p).all() for p in new.values())
    assert any(p.abs().sum() > 0 for p in new.values()), "new parameters were left uninitialised"
    torch.testing.assert_close(outputs_of(retrofitted, inputs), outputs_of(stock, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
@pytest.mark.parametrize("variant,options", PRESERVING)
def test_retrofit_with_convert_preserves_outputs(arch, variant, options, stock_checkpoints):
    inputs = example_inputs(arch)
    expected = outputs_of(stock_eager(arch, stock_checkpoints[arch]), inputs)
    stock = AUTO_FOR_ARCH[arch].from_pretrained(stock_checkpoints[arch])
    model = hfna.convert(stock, variant, layers="all", **options)
    assert model.config.retrofitted_from == str(stock_checkpoints[arch])
    torch.testing.assert_close(outputs_of(model, inputs), expected, rtol=0, atol=1e-5)


# One subprocess per variant, each on another architecture (each costs ~9 s); in-process retrofits cover the rest of
# the grid above, and tests/test_any_architecture.py runs the command on a further head.
@pytest.mark.slow
@pytest.mark.parametrize("arch,variant", [("gpt2", "neural"), ("llama", "cdape"), ("vit", "expressive")])
def test_retrofit_script(arch, variant, stock_checkpoints, tmp_path):
    options = {"expressive": ["--option", "scale=true"], "neural": ["--option", "combine=add"],
               "cdape": ["--option", "kernel_size=5", "--option", "bias=none"]}[variant]
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "retrofit.py"), str(stock_checkpoints[arch]), variant,
         str(tmp_path / "out"), "--layers", "all", *options],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = AUTO_FOR_ARCH[arch].from_pretrained(tmp_path / "out")
    assert type(loaded) is VARIANT_CLASS_FOR_ARCH[arch] and loaded.config.attention_variant == variant
    assert loaded.config.attention_variant_layers == [0, 1]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"Retrofitted from [`{stock_checkpoints[arch]}`]" in card
    stock = stock_eager(arch, stock_checkpoints[arch])
    inputs = example_inputs(arch)
    if variant == "expressive":  # changes outputs, as the README says
        assert (outputs_of(loaded, inputs) - outputs_of(stock, inputs)).abs().max() > 1e-4
    else:
        torch.testing.assert_close(outputs_of(loaded, inputs), outputs_of(stock, inputs), rtol=0, atol=1e-5)


def test_retrofit_from_a_variant_checkpoint_takes_the_new_variants_default_layers(tmp_path):
    """A saved dot model stores its resolved layers (all of them); retrofitting it to neural without naming layers
    must give neural's paper default (the first layer), while explicit layers and same-variant reloads are kept."""
    dot = hfna.VariantGPT2LMHeadModel(hfna.VariantGPT2Config(
        n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, attention_variant="dot"))
    dot.save_pretrained(tmp_path / "dot")
    assert dot.config.attention_variant_layers == [0, 1, 2]
    neural = hfna.VariantGPT2LMHeadModel.from_pretrained(tmp_path / "dot", attention_variant="neural")
    assert neural.config.attention_variant_layers == [0]
    explicit = hfna.VariantGPT2LMHeadModel.from_pretrained(tmp_path / "dot", attention_variant="neural",
                                                           attention_variant_layers=[1, 2])
    assert explicit.config.attention_variant_layers == [1, 2]
    explicit.save_pretrained(tmp_path / "neural")
    again = hfna.VariantGPT2LMHeadModel.from_pretrained(tmp_path / "neural", attention_variant="neural")
    assert again.config.attention_variant_layers == [1, 2]


@pytest.mark.slow
def test_retrofit_script_bad_option_is_a_clear_error(stock_checkpoints, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "retrofit.py"), str(stock_checkpoints["gpt2"]), "cdape",
         str(tmp_path / "out"), "--option", "kernel_size=4"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "kernel_size must be odd" in result.stderr
    assert not (tmp_path / "out").exists()


# ---- checkpoints that do not fit --------------------------------------------------------------------------------

def test_variant_checkpoint_into_stock_class_is_reported(saved_checkpoints, caplog):
    """A stock class cannot be taught to refuse; Transformers reports the model type and the dropped weights."""
    from transformers.utils import logging as hf_logging

    folder = next(folder for arch, variant, folder, _ in saved_checkpoints if (arch, variant) == ("gpt2", "cdape"))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            model, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    finally:
        hf_logging.disable_propagation()
        hf_logging.set_verbosity(verbosity)
    assert any(".attention_variant." in key for key in info["unexpected_keys"])
    assert "variant_gpt2" in caplog.text and "attention_variant.conv_in.weight" in caplog.text
    assert "UNEXPECTED" in caplog.text


def test_wrong_architecture_checkpoint_into_variant_class_raises(stock_checkpoints):
    with pytest.raises((ValueError, RuntimeError)):
        hfna.VariantGPT2LMHeadModel.from_pretrained(stock_checkpoints["llama"], attention_variant="cdape")


def test_checkpoint_with_other_variant_options_raises(saved_checkpoints):
    folder = next(folder for arch, variant, folder, _ in saved_checkpoints if (arch, variant) == ("llama", "cdape"))
    with pytest.raises(RuntimeError, match="size mismatch|mismatch"):
        hfna.VariantLlamaForCausalLM.from_pretrained(
            folder, attention_variant_options={"hidden_size": 8, "bias": "kerple"})


def test_stock_checkpoint_with_wrong_shapes_raises(stock_checkpoints):
    with pytest.raises(RuntimeError, match="mismatch"):
        hfna.VariantGPT2LMHeadModel.from_pretrained(stock_checkpoints["gpt2"], n_embd=32, attention_variant="cdape")


def test_variant_checkpoint_loaded_as_other_variant_raises(saved_checkpoints):
    folder = next(folder for arch, variant, folder, _ in saved_checkpoints if (arch, variant) == ("gpt2", "neural"))
    with pytest.raises(ValueError, match="does not fit VariantGPT2LMHeadModel .* which would be dropped"):
        hfna.VariantGPT2LMHeadModel.from_pretrained(folder, attention_variant="cdape", attention_variant_options={})


# ---- model cards and the Hub folder -------------------------------------------------------------------------------

def test_model_card_metadata(saved_checkpoints):
    from huggingface_hub import ModelCard

    for arch, variant, folder, model in saved_checkpoints:
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "transformers"
        assert f"attention-variant-{variant}" in card.data.tags
        arxiv = {"expressive": "2407.18601", "neural": "2502.17206", "cdape": "2410.04798"}[variant]
        assert f"arxiv:{arxiv}" in card.data.tags
        assert "trust_remote_code=True" in card.text
        assert f"{AUTO_FOR_ARCH[arch].__name__}.from_pretrained" in card.text


def test_model_card_base_model_datasets_and_metrics():
    model = hfna.convert(tiny_llama(), "cdape")
    model.config.retrofitted_from = "meta-llama/Llama-3.2-1B"
    card = hfna.build_model_card(model, repo_id="someone/llama-cdape", datasets=["wikitext"],
                                 metrics=["perplexity"], results="| split | perplexity |\n|---|---|\n| val | 12.3 |")
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.datasets == ["wikitext"] and card.data.metrics == ["perplexity"]
    assert 'from_pretrained("someone/llama-cdape", trust_remote_code=True)' in card.text
    assert "| val | 12.3 |" in card.text


def test_push_to_hub_uploads_weights_code_and_card_together(monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    class Repo:
        repo_id = "someone/gpt2-neural"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: Repo())
    uploaded = {}

    class Commit:
        commit_url = "https://huggingface.co/someone/gpt2-neural/commit/1"
        pr_url = None

    def capture(self, *, repo_id, folder_path, **kwargs):  # HfApi.upload_folder, the public API
        uploaded["repo_id"] = repo_id
        uploaded["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return Commit()

    monkeypatch.setattr(HfApi, "upload_folder", capture)
    model = converted(tiny_gpt2, "neural")
    assert model.push_to_hub("someone/gpt2-neural", datasets=["wikitext"]) == Commit.commit_url
    assert uploaded["repo_id"] == "someone/gpt2-neural"
    files = uploaded["files"]
    assert {"model.safetensors", "config.json", "modeling_variants.py", "neural.py", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "attention-variant-neural" in card and "wikitext" in card and "trust_remote_code=True" in card


def test_llama_without_rotary_embeddings_nope(tmp_path):
    base = tiny_llama().config.to_dict()
    base.pop("model_type", None)
    ids = torch.randint(1, VOCAB, (1, 12))
    shifted = torch.arange(12)[None] * 3  # stretched positions: RoPE sees new relative distances
    results = {}
    for use_rope in (True, False):
        config = hfna.VariantLlamaConfig(**base, attention_variant="cdape", attention_variant_options={"bias": "alibi"},
                                         use_rotary_embeddings=use_rope)
        torch.manual_seed(0)
        model = hfna.VariantLlamaForCausalLM(config).eval()
        with torch.no_grad():
            results[use_rope] = (model(ids).logits - model(ids, position_ids=shifted).logits).abs().max()
        if not use_rope:
            model.save_pretrained(tmp_path)
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
            assert loaded.config.use_rotary_embeddings is False
            assert type(loaded.model.rotary_emb).__name__ == "NoRotaryEmbedding"
            with torch.no_grad():
                torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    assert results[True] > 1e-4  # rotary embeddings read the positions
    assert results[False] < 1e-6  # NoPE (+ relative ALiBi bias) does not


def test_variant_checkpoint_missing_its_variant_weights_raises(saved_checkpoints, tmp_path):
    """A checkpoint whose config says it holds a variant must hold its weights; it never loads as a fresh retrofit."""
    from safetensors.torch import load_file as read, save_file as write

    folder = next(folder for arch, variant, folder, _ in saved_checkpoints if (arch, variant) == ("llama", "cdape"))
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    weights = read(str(damaged / "model.safetensors"))
    kept = {name: t for name, t in weights.items() if "layers.1.self_attn.attention_variant." not in name}
    assert len(kept) < len(weights)
    write(kept, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks that variant's weights: \['model.layers.1.self_attn.attention_var"):
        AutoModelForCausalLM.from_pretrained(damaged)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_base_auto_model_loads_from_a_checkpoint_with_a_head(arch, tmp_path):
    """As in Transformers, AutoModel on a causal-LM checkpoint ignores the head (Llama's lm_head is not tied)."""
    model = converted(ALL_BUILDERS[arch], "cdape")
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is {"llama": hfna.VariantLlamaModel, "gpt2": hfna.VariantGPT2Model}[arch]
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.base_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(base(input_ids=ids).last_hidden_state, expected, rtol=0, atol=1e-6)


NON_DEFAULT_OPTIONS = {
    "expressive": {"form": "softmax_square", "scale": True},
    "neural": {"proj_dim": 3, "hidden_dims": [5, 2, 2], "per_head": True, "combine": "add", "activation": "leaky_relu",
               "init": "alive"},
    "cdape": {"kernel_size": 5, "hidden_size": 6, "bias": "alibi", "zero_init": False},
}


@pytest.mark.parametrize("variant", list(NON_DEFAULT_OPTIONS))
def test_every_non_default_option_survives_the_round_trip(variant, tmp_path):
    options = NON_DEFAULT_OPTIONS[variant]
    spec = hfna.VARIANT_CLASSES[variant].options_spec
    assert set(options) == set(spec), "every option of the variant is exercised"
    assert all(options[name] != spec[name].default for name in options)
    model = converted(ALL_BUILDERS["gpt2"], variant, **options)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for module in (m for m in loaded.modules() if isinstance(m, hfna.AttentionVariant)):
        assert module.options == options
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
