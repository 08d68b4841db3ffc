"""Tiny models built from configs (no downloads) and helpers shared by the test files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run through Triton's interpreter on this CPU; triton reads this when a kernel is decorated, and
# importing Transformers' models already imports triton, so it is set before anything else is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import hf_neural_attention as hfna
from hf_neural_attention.injection import VARIANT_ATTRIBUTE

VOCAB = 97

# Options that make each variant exercise all of its machinery (biases, per-head weights, positional channels).
RICH_OPTIONS = {
    "dot": {},
    "expressive": {"form": "rational", "scale": True},
    "neural": {"combine": "replace", "proj_dim": 4, "hidden_dims": [8, 4]},  # paper widths at d_h=16 are 1 unit
    "cdape": {"bias": "kerple"},
}


def tiny_gpt2(**kwargs) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kwargs,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(**kwargs) -> LlamaForCausalLM:
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs,
    )
    return LlamaForCausalLM(config).eval()


def tiny_vit(**kwargs) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kwargs,
    )
    return ViTForImageClassification(config).eval()


CAUSAL_BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
ALL_BUILDERS = {**CAUSAL_BUILDERS, "vit": tiny_vit}


def added_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {
        name: parameter for name, parameter in model.named_parameters() if f".{VARIANT_ATTRIBUTE}." in f".{name}"
    }


@torch.no_grad()
def perturb_added_parameters(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Moves every added parameter away from its init, so zero-initialised parts cannot hide a leak."""
    generator = torch.Generator().manual_seed(1234)
    for parameter in added_parameters(model).values():
        parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


def converted(builder, variant: str, layers="all", perturb: bool = True, seed: int = 0, **options):
    torch.manual_seed(seed)
    model = builder()
    hfna.convert(model, variant, layers=layers, **{**RICH_OPTIONS[variant], **options})
    if perturb:
        perturb_added_parameters(model)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One datasets/tokenizer cache for the whole session (built from scratch each run: no network, no state)."""
    return str(tmp_path_factory.mktemp("data-cache"))


# Loads checkpoints with trust_remote_code=True in a process where hf_neural_attention cannot be imported, runs each
# on the inputs stored in its expected_outputs.safetensors and reports the class, the implementation and the largest
# difference from the stored logits.
REMOTE_CODE_LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "hf_neural_attention" or name.startswith("hf_neural_attention."):
                raise ImportError("hf_neural_attention is blocked in this process")

    sys.meta_path.insert(0, BlockPackage())
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    try:
        import hf_neural_attention
        raise SystemExit("the import was not blocked")
    except ImportError:
        pass

    report = {}
    for folder, auto in json.loads(sys.argv[1]):
        auto_class = {"AutoModelForCausalLM": AutoModelForCausalLM,
                      "AutoModelForImageClassification": AutoModelForImageClassification}[auto]
        model = auto_class.from_pretrained(folder, trust_remote_code=True)
        expected = load_file(folder + "/expected_outputs.safetensors")
        inputs = {name: tensor for name, tensor in expected.items() if name != "logits"}
        with torch.no_grad():
            logits = model(**inputs).logits
        report[folder] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "implementation": model.config._attn_implementation,
            "max_diff": (logits - expected["logits"]).abs().max().item(),
        }
    assert not any(name.startswith("hf_neural_attention") for name in sys.modules)
    print("REPORT" + json.dumps(report))
    """
)




def load_repo_file(relative_path: str, name: str):
    """A script of the repository (not a package module) imported as a module, for its functions."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_without_the_package(jobs: list[list[str]], tmp_path) -> dict:
    """jobs: [folder, Auto class name]; returns {folder: {class, module, implementation, max_diff}}."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_LOADER, json.dumps(jobs)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("REPORT", 1)[1])


# A few words of English, each its own token: enough for a tokenizer that encodes and decodes real text offline.
TINY_WORDS = ("the a of and to in is it that was for on with as he she they at by this from we you or an be had "
              "not are but his her were all there one can so what when up out if about who them then some into more "
              "her time has two like him see no could very my than first been its now day over did down only way "
              "cat dog sat mat ran sun rain").split()


def tiny_word_tokenizer():
    """A word-level fast tokenizer built offline (no files, no network): token 0 is <|endoftext|> (bos, eos, pad),
    1 is <unk>, then one token per word of TINY_WORDS; its length fits the tiny models' VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for word in TINY_WORDS:
        vocab.setdefault("\u2581" + word, len(vocab))  # each word with its leading space, as SentencePiece marks it
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()  # words split on spaces, each prefixed with \u2581
    backend.decoder = decoders.Metaspace(prepend_scheme="never")  # each piece keeps its space, as GPT-2 BPE does
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")
