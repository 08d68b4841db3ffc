"""hfna-retrofit and tokenizers: a checkpoint without tokenizer files gets no tokenizer in the output (Transformers
would otherwise build an empty one from the model type, and text generation would return the prompt unchanged), and
says so; a checkpoint with a tokenizer gets it copied, and the output generates text through pipeline()."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

from conftest import tiny_gpt2, tiny_word_tokenizer
from hf_neural_attention.commands.retrofit import main

TOKENIZER_FILES = {"tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json"}


def test_checkpoint_without_tokenizer_saves_none_and_says_so(tmp_path, capsys):
    tiny_gpt2().save_pretrained(tmp_path / "stock")
    assert main([str(tmp_path / "stock"), "neural", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "no tokenizer or image processor saved" in printed and "with its" not in printed
    saved = {path.name for path in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in saved and not saved & TOKENIZER_FILES


def test_checkpoint_with_tokenizer_copies_it_and_generates(tmp_path, capsys):
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(tmp_path / "stock")
    tiny_word_tokenizer().save_pretrained(tmp_path / "stock")
    assert main([str(tmp_path / "stock"), "cdape", str(tmp_path / "out")]) == 0
    assert " with its " in capsys.readouterr().out and (tmp_path / "out" / "tokenizer.json").exists()
    generator = pipeline("text-generation", model=str(tmp_path / "out"), trust_remote_code=True)
    assert generator.model.config.attention_variant == "cdape"
    prompt = "the cat sat on the"
    text = generator(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text.split()) > len(prompt.split())
