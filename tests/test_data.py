"""Offline data building: deterministic, split by document, no network; local folders; clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from hf_neural_attention.experiments import data as data_lib


def test_split_by_document_is_deterministic():
    names = [f"pkg/module_{i}.py" for i in range(2000)]
    splits = [data_lib.split_of(name) for name in names]
    assert splits == [data_lib.split_of(name) for name in names]
    share = {split: splits.count(split) / len(names) for split in data_lib.SPLITS}
    assert 0.85 < share["train"] < 0.95 and 0.03 < share["validation"] < 0.07 and 0.03 < share["test"] < 0.07


@pytest.mark.slow  # builds the corpus from the standard library
def test_stdlib_prose_corpus(data_cache):
    corpus = data_lib.load_stdlib_corpus("prose", cache_dir=data_cache)
    again = data_lib.load_stdlib_corpus("prose", cache_dir=data_cache)
    assert corpus["train"]["name"] == again["train"]["name"]
    names = {split: set(corpus[split]["name"]) for split in data_lib.SPLITS}
    assert not names["train"] & names["validation"] and not names["train"] & names["test"]
    assert len(corpus["train"]) > 300 and len(corpus["validation"]) > 10 and len(corpus["test"]) > 10
    text = " ".join(corpus["train"][:50]["text"])
    assert "def " not in text[:2000] and "Return" in text  # docstrings, not code
    assert sum(len(t) for t in corpus["train"]["text"]) > 500_000


@pytest.mark.slow  # builds the corpus from the standard library
def test_stdlib_code_corpus_is_source(data_cache):
    corpus = data_lib.load_stdlib_corpus("code", cache_dir=data_cache)
    assert any("def " in text and "import " in text for text in corpus["validation"]["text"])


def test_docstring_extraction():
    source = '"""Module docstring with enough words here."""\ndef f():\n    """Function docs that are long enough."""\n'
    assert data_lib.module_docstrings(source) == (
        "Module docstring with enough words here.\n\nFunction docs that are long enough.")


def test_bpe_tokenizer_trained_locally_is_deterministic(tmp_path, data_cache):
    corpus = data_lib.load_stdlib_corpus("prose", cache_dir=data_cache)
    subset = corpus["train"].select(range(40))
    first = data_lib.train_bpe_tokenizer(subset, 600, save_dir=tmp_path / "a")
    second = data_lib.train_bpe_tokenizer(subset, 600, save_dir=tmp_path / "b")
    assert first.get_vocab() == second.get_vocab() and len(first) == 600
    text = "Return the number of bytes in the buffer."
    assert first.decode(first(text)["input_ids"]) == text
    reloaded = data_lib.train_bpe_tokenizer(subset, 600, save_dir=tmp_path / "a")  # cached: loads, no training
    assert reloaded(text)["input_ids"] == first(text)["input_ids"]


def test_pack_blocks():
    from datasets import Dataset, DatasetDict

    tokenized = DatasetDict({"train": Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]})})
    blocks = data_lib.pack_blocks(tokenized, 4)["train"]
    assert blocks["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9 is the dropped remainder
    assert blocks["labels"] == blocks["input_ids"]


def test_digits(data_cache):
    dataset, num_labels, channels = data_lib.load_image_dataset("digits", cache_dir=data_cache)
    assert (num_labels, channels) == (10, 1)
    assert [len(dataset[s]) for s in data_lib.SPLITS] == [1437, 180, 180]
    image = dataset["train"][0]["pixel_values"]
    assert tuple(image.shape) == (1, 8, 8) and -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    labels = np.array(dataset["test"]["labels"])
    assert set(labels.tolist()) == set(range(10))
    again, _, _ = data_lib.load_image_dataset("digits", cache_dir=data_cache)
    assert np.array_equal(np.array(again["test"]["labels"]), labels)


def test_local_text_files(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i}.txt").write_text(f"Document number {i}. " * 20)
    raw = data_lib.load_text_dataset("text", data_files=str(tmp_path / "*.txt"), cache_dir=str(tmp_path / "c"))
    assert sum(len(raw[s]) for s in data_lib.SPLITS) == 30 and len(raw["validation"]) >= 1


def test_local_image_folder(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), (i * 20, 0, 0) if label == "cat" else (0, i * 20, 0)).save(
                tmp_path / "images" / label / f"{i}.png")
    dataset, num_labels, channels = data_lib.load_image_dataset(
        "imagefolder", data_dir=str(tmp_path / "images"), cache_dir=str(tmp_path / "c"), image_size=8)
    assert (num_labels, channels) == (2, 3)
    assert tuple(dataset["train"][0]["pixel_values"].shape) == (3, 8, 8)


def test_missing_paths_and_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_lib.load_text_dataset("text", data_files=str(tmp_path / "nothing-*.txt"))
    with pytest.raises(FileNotFoundError, match="needs an existing data_dir"):
        data_lib.load_image_dataset("imagefolder", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"Unknown text dataset 'wiki'; valid text datasets are"):
        data_lib.load_text_dataset("wiki")
    with pytest.raises(ValueError, match=r"Unknown image dataset 'mnist'"):
        data_lib.load_image_dataset("mnist")


def test_own_text_from_a_single_file_and_from_split_files(tmp_path, data_cache, caplog):
    """One file is one document: the splits then come from paragraphs (or lines), and the log says so; separate
    split files are used as given."""
    from hf_neural_attention.experiments.data import load_text_dataset, parse_data_files

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} talks about topic {i % 7} in a few plain words." for i in range(60)))
    with caplog.at_level("WARNING"):
        raw = load_text_dataset("text", str(corpus), cache_dir=data_cache)
    assert "split by paragraph" in caplog.text
    assert len(raw["train"]) + len(raw["validation"]) + len(raw["test"]) == 60
    assert len(raw["validation"]) >= 1 and len(raw["test"]) >= 1

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(f"line {i} of a file with no blank lines" for i in range(40)))
    raw = load_text_dataset("text", str(lines), cache_dir=data_cache)
    assert sum(len(raw[split]) for split in raw) == 40

    valid = tmp_path / "valid.txt"
    valid.write_text("a held-out document written by hand\n")
    raw = load_text_dataset("text", f"train={lines},validation={valid}", cache_dir=data_cache)
    assert len(raw["validation"]) == 1 and "held-out document" in raw["validation"][0]["text"]
    assert len(raw["test"]) >= 1

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just one line\n")
    with pytest.raises(ValueError, match="at least 20 are needed"):
        load_text_dataset("text", str(tiny), cache_dir=data_cache)
    with pytest.raises(ValueError, match="each entry must be split=path"):
        parse_data_files("training=a.txt")
