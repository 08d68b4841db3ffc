"""Every architecture `convert` accepts, with every head an Auto class serves, saves and reloads with its variant:
through `AutoModel*.from_pretrained` with the package imported, through `trust_remote_code=True` in a process that
cannot import it, and a base `AutoModel` from a checkpoint with a head. Loading without a way to restore the variant
raises instead of returning a stock model."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModel

import hf_neural_attention as hfna
from hf_neural_attention.modeling_variants import auto_classes, stock_classes_by_auto_class
from conftest import added_parameters, perturb_added_parameters

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            pad_token_id=0, max_position_embeddings=64)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, pad_token_id=0,
                                            bos_token_id=0, eos_token_id=0, n_positions=64),
    "llama": lambda: transformers.LlamaConfig(**TEXT, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**TEXT, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**TEXT, num_key_value_heads=2, sliding_window=4),  # banded
    "gemma": lambda: transformers.GemmaConfig(**TEXT, num_key_value_heads=1, head_dim=8),
    "phi": lambda: transformers.PhiConfig(**TEXT),
    "phi3": lambda: transformers.Phi3Config(**TEXT),
    "bert": lambda: transformers.BertConfig(**TEXT),
    "vit": lambda: transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=16, patch_size=4, num_labels=3),
    "clip": lambda: transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=VOCAB, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8), projection_dim=16),
    "whisper": lambda: transformers.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, num_mel_bins=8, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, decoder_start_token_id=1),
}
VARIANTS = ("cdape", "neural", "expressive")
# Every (architecture, Auto class, stock head) the installed Transformers serves, the variant cycling over them.
CASES = [(arch, auto, head.__name__, VARIANTS[index % len(VARIANTS)])
         for index, (arch, auto, head) in enumerate(
             (arch, auto, head) for arch in CONFIGS
             for auto, head in stock_classes_by_auto_class(type(CONFIGS[arch]())).items())]


def example_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    parameters = inspect.signature(model.forward).parameters
    inputs = {}
    if "input_ids" in parameters:
        shape = (2, 2, 8) if "MultipleChoice" in type(model).__name__ else (2, 8)
        inputs["input_ids"] = torch.randint(1, VOCAB, shape, generator=generator)
        inputs["attention_mask"] = torch.ones(shape, dtype=torch.long)
        inputs["attention_mask"][..., 1, -2:] = 0  # a padded second row
    if "pixel_values" in parameters:
        inputs["pixel_values"] = torch.randn(2, 3, 16, 16, generator=generator)
    if "input_features" in parameters:
        inputs["input_features"] = torch.randn(2, 8, 16, generator=generator)
        if "decoder_input_ids" in parameters:
            inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (2, 5), generator=generator)
    return inputs


def first_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).to_tuple()[0]


def converted_head(arch: str, head: str, variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(transformers, head)(CONFIGS[arch]())
    hfna.convert(model, variant, layers="all")
    perturb_added_parameters(model)  # zero-initialised parts cannot hide a weight that fails to load
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saves each case once: {(arch, auto): (folder, converted model)}."""
    root = tmp_path_factory.mktemp("any-architecture")
    checkpoints = {}
    for arch, auto, head, variant in CASES:
        model = converted_head(arch, head, variant)
        folder = root / f"{arch}-{auto}"
        model.save_pretrained(folder)
        checkpoints[arch, auto] = (folder, model)
    return checkpoints


@pytest.mark.slow  # 53 heads of 11 architectures saved and reloaded
@pytest.mark.parametrize("arch,auto,head,variant", CASES, ids=[f"{a}-{h}-{v}" for a, _, h, v in CASES])
def test_every_head_round_trips_through_its_auto_class(arch, auto, head, variant, saved):
    folder, model = saved[arch, auto]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == f"variant_{type(model.config).stock_config_class.model_type}"
    assert config["attn_implementation"] == variant  # a stock class loading it fails on the implementation
    loaded = auto_classes()[auto].from_pretrained(folder)
    assert type(loaded).__name__ == f"Variant{head}" and type(loaded).stock_model_class is getattr(transformers, head)
    for field in ("attention_variant", "attention_variant_options", "attention_variant_layers"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    expected = added_parameters(model)
    for name, parameter in added_parameters(loaded).items():
        torch.testing.assert_close(parameter, expected.pop(name), rtol=0, atol=0, msg=name)
    assert not expected, f"variant weights lost on reload: {sorted(expected)}"
    inputs = example_inputs(model)
    torch.testing.assert_close(first_output(loaded, inputs), first_output(model, inputs), rtol=0, atol=1e-6)
    if auto == "AutoModelForCausalLM" and all(module.is_causal for _, module in hfna.find_attention_modules(model)):
        # a decoder: greedy generation with the KV cache after the reload equals the original without the cache
        prompt = inputs["input_ids"][:, :5]
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        cached = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **settings)
        uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **settings)
        assert torch.equal(cached, uncached), (cached, uncached)


def stock_of(cls: type) -> type:
    return getattr(cls, "stock_model_class", cls)


def same_base_layout(head: torch.nn.Module) -> bool:
    """Whether the head holds AutoModel's base model under the base model's own prefix."""
    base_class = stock_classes_by_auto_class(type(head.config).stock_config_class)["AutoModel"]
    return stock_of(type(head.base_model)) is base_class and head.base_model_prefix == base_class.base_model_prefix


@pytest.mark.slow  # the 53 saved heads
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_base_auto_model_loads_from_every_head_checkpoint(arch, saved, caplog):
    """AutoModel ignores a head's weights, as Transformers does for feature extraction. Where the head does not hold
    AutoModel's base model under its prefix (Llama's question answering stores it under "transformer", CLIP's image
    classifier holds only the vision tower), the stock AutoModel starts from random weights; here that load fails
    where it lacks variant weights of the layers the checkpoint holds a variant in, and warns naming the stock
    weights it lacks otherwise.""" 
    for (case_arch, auto), (folder, model) in saved.items():
        if case_arch != arch or auto == "AutoModel":
            continue
        if not same_base_layout(model):
            caplog.clear()
            with caplog.at_level("WARNING"):
                try:
                    AutoModel.from_pretrained(folder)
                except ValueError as error:
                    assert "lacks that variant's weights" in str(error), (auto, error)
                else:
                    assert "lacks these stock weights, which start from a random init" in caplog.text, auto
            continue
        base = AutoModel.from_pretrained(folder)
        assert type(base).stock_model_class is stock_of(type(model.base_model))
        inputs = example_inputs(base)
        torch.testing.assert_close(first_output(base, inputs), first_output(model.base_model, inputs),
                                   rtol=0, atol=1e-6, msg=f"{arch} {auto}")


# Loads checkpoints in a fresh process, with hf_neural_attention imported (argv[2] == "with-package") or where it
# cannot be imported (then with trust_remote_code=True), through each job's Auto class (and AutoModel where the job asks
# for it), and reports the outputs. Without the package, loading without trust_remote_code, or with the stock class,
# must raise. With it, each checkpoint is first loaded before find_every_architecture() (the named architectures load,
# the others ask for trust_remote_code), then after it.
REMOTE_LOADER = textwrap.dedent(
    """
    import importlib.abc, inspect, json, sys
    import torch, transformers
    from transformers.models.auto import modeling_auto

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "hf_neural_attention":
                raise ImportError("hf_neural_attention is blocked in this process")

    def attempt(load):
        try:
            load()
            return "loaded"
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    jobs, with_package = json.loads(sys.argv[1]), sys.argv[2] == "with-package"
    if with_package:
        import hf_neural_attention
    else:
        sys.meta_path.insert(0, BlockPackage())
    report = {folder: {} for folder, _, _, _ in jobs}
    # First, before any checkpoint's code has registered the variants' names with Transformers:
    for folder, auto, head, _ in jobs:
        auto_class = getattr(modeling_auto, auto)
        if with_package:
            report[folder]["before opt-in"] = attempt(lambda: auto_class.from_pretrained(folder))
        else:
            report[folder]["auto without trust_remote_code"] = attempt(
                lambda: auto_class.from_pretrained(folder, trust_remote_code=False))
            report[folder]["stock class"] = attempt(lambda: getattr(transformers, head).from_pretrained(folder))
    if with_package:
        hf_neural_attention.find_every_architecture()
    for folder, auto, head, with_base in jobs:
        inputs = torch.load(folder + "/inputs.pt")
        for name in (auto, "AutoModel") if with_base else (auto,):
            model = getattr(modeling_auto, name).from_pretrained(folder, trust_remote_code=not with_package)
            with torch.no_grad():
                output = model(**{k: v for k, v in inputs.items() if k in inspect.signature(model.forward).parameters})
            report[folder][name] = {"class": type(model).__name__, "module": type(model).__module__,
                                    "output": output.to_tuple()[0].tolist()}
    assert with_package or not any(name.startswith("hf_neural_attention") for name in sys.modules)
    print("REPORT" + json.dumps(report))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["without-package", "with-package"])
def test_a_fresh_process_restores_every_architecture(mode, saved, tmp_path):
    """Without the package, every head the Auto classes serve loads through trust_remote_code (a generic head builds
    its base model with AutoModel.from_config, which must find the checkpoint's variant base model), plus AutoModel
    from one head checkpoint per architecture. With the package, that one head and AutoModel through the Auto classes
    alone: the named architectures at once, the others after the opt-in find_every_architecture()."""
    firsts = {arch: next(auto for (case_arch, auto), (_, model) in saved.items()
                         if case_arch == arch and auto != "AutoModel" and same_base_layout(model)) for arch in CONFIGS}
    jobs, models = [], {}
    for (arch, auto), (folder, model) in saved.items():
        if mode == "with-package" and auto != firsts[arch]:
            continue
        inputs = example_inputs(model)
        torch.save(inputs, folder / "inputs.pt")
        jobs.append([str(folder), auto, type(model).stock_model_class.__name__, auto == firsts[arch]])
        models[str(folder)] = (arch, auto, model, inputs)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO) if mode == "with-package" else ""}  # this clone's package, or none
    result = subprocess.run([sys.executable, "-c", REMOTE_LOADER, json.dumps(jobs), mode], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    code = "hf_neural_attention." if mode == "with-package" else "transformers_modules."
    for folder, (arch, auto, model, inputs) in models.items():
        entry = report[folder]
        assert entry[auto]["class"] == type(model).__name__ and entry[auto]["module"].startswith(code), entry[auto]
        torch.testing.assert_close(torch.tensor(entry[auto]["output"]), first_output(model, inputs), rtol=0,
                                   atol=1e-5, msg=folder)
        if auto == firsts[arch]:
            base_inputs = {k: v for k, v in inputs.items()
                           if k in inspect.signature(model.base_model.forward).parameters}
            torch.testing.assert_close(torch.tensor(entry["AutoModel"]["output"]),
                                       first_output(model.base_model, base_inputs), rtol=0, atol=1e-5, msg=folder)
        if mode == "without-package":
            assert "trust_remote_code" in entry["auto without trust_remote_code"], entry
            assert model.config.attention_variant in entry["stock class"], entry  # unknown attn_implementation
        elif arch in ("gpt2", "llama", "vit"):
            assert entry["before opt-in"] == "loaded", entry
        else:
            assert "trust_remote_code" in entry["before opt-in"], entry


@pytest.mark.slow  # the 53 saved heads
def test_a_stock_class_loading_a_variant_checkpoint_fails_on_first_use(saved):
    """With the package imported the variant's name is a known implementation, so the stock class loads (Transformers
    reports the unexpected variant weights) and its first forward says what is wrong."""
    folder, model = saved["qwen2", "AutoModelForCausalLM"]
    stock = transformers.Qwen2ForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="A variant checkpoint loaded with its stock class lacks them"):
        stock(**example_inputs(model))


def test_a_class_outside_transformers_converts_but_refuses_to_save(tmp_path, caplog):
    class MyGPT2(transformers.GPT2LMHeadModel):
        pass

    model = MyGPT2(CONFIGS["gpt2"]())
    with caplog.at_level("WARNING"):
        hfna.convert(model, "cdape")
    assert "is not a Transformers class" in caplog.text
    model(torch.randint(1, VOCAB, (1, 6)))  # runs in memory
    with pytest.raises(ValueError, match="MyGPT2 is not a Transformers class"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_a_model_whose_config_is_not_its_config_class_is_refused_up_front():
    class OtherConfig(transformers.GPT2Config):
        pass

    model = transformers.GPT2LMHeadModel(CONFIGS["gpt2"]())
    model.config.__class__ = OtherConfig
    with pytest.raises(ValueError, match="holds a OtherConfig but declares config_class GPT2Config"):
        hfna.convert(model, "cdape")
    assert not added_parameters(model)  # nothing changed


@pytest.mark.slow
def test_retrofit_command_keeps_any_head(tmp_path):
    """hfna-retrofit loads the class the checkpoint was saved from (its architectures), so a Qwen2 sequence classifier
    stays one, and the function-preserving cdape gives the stock outputs."""
    torch.manual_seed(0)
    stock = transformers.Qwen2ForSequenceClassification(CONFIGS["qwen2"]()).eval()
    stock.save_pretrained(tmp_path / "stock")
    result = subprocess.run(
        [sys.executable, "-m", "hf_neural_attention.commands.retrofit", str(tmp_path / "stock"), "cdape",
         str(tmp_path / "out"), "--layers", "all"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert type(loaded).__name__ == "VariantQwen2ForSequenceClassification"
    assert loaded.config.attention_variant == "cdape" and loaded.config.retrofitted_from == str(tmp_path / "stock")
    inputs = example_inputs(stock)
    eager = transformers.Qwen2ForSequenceClassification.from_pretrained(tmp_path / "stock", attn_implementation="eager")
    torch.testing.assert_close(first_output(loaded, inputs), first_output(eager, inputs), rtol=0, atol=1e-5)
