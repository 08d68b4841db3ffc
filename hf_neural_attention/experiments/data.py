"""Data for training and evaluation: offline defaults built on this machine, and the papers' real data sets.

Offline (no downloads, deterministic):
- "stdlib-prose": the docstrings of the running Python's standard library, one document per module file.
- "stdlib-code": the standard library's source files, one document per file.
- "digits": scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes).
Online (through `datasets.load_dataset`, as the papers used; needs the Hub):
- "wikitext-103" / "wikitext-2" (raw), "cifar10", "cifar100".
Local folders a user names: "text" (`data_files`: .txt files) and "imagefolder" (`data_dir`).

Text is split into train/validation/test BY DOCUMENT (a hash of the document's name), tokenized with a byte-level
BPE tokenizer trained locally on the train split (saved with each model), and packed into blocks. Everything is
built and cached through `datasets`.
"""

from __future__ import annotations

import ast
import glob
import logging
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

TEXT_DATASETS = ("stdlib-prose", "stdlib-code", "wikitext-103", "wikitext-2", "text")
IMAGE_DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
logger = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


def split_of(name: str, validation_percent: int = 5, test_percent: int = 5) -> str:
    """Deterministic document-level split from a hash of the document's name."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
    if bucket < test_percent:
        return "test"
    if bucket < test_percent + validation_percent:
        return "validation"
    return "train"


def stdlib_files() -> list[Path]:
    """The standard library's own .py files (no tests, no site-packages), sorted for determinism."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}:
            continue
        files.append(path)
    return files


def module_docstrings(source: str) -> str:
    """All docstrings of a module (module, classes, functions) as paragraphs of English prose."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            if docstring and len(docstring.split()) >= 5:
                texts.append(docstring)
    return "\n\n".join(texts)


def _stdlib_documents(kind: str, split: str) -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        name = str(path.relative_to(root))
        if split_of(name) != split:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        text = module_docstrings(source) if kind == "prose" else source
        if text.strip():
            yield {"name": name, "text": text}


def load_stdlib_corpus(kind: str = "prose", cache_dir: str | None = None) -> DatasetDict:
    """The standard-library corpus as a DatasetDict with train/validation/test (cached by `datasets`)."""
    if kind not in ("prose", "code"):
        raise ValueError(f"kind must be 'prose' or 'code'; got {kind!r}")
    return DatasetDict({
        split: Dataset.from_generator(
            _stdlib_documents, gen_kwargs={"kind": kind, "split": split}, cache_dir=cache_dir,
            config_name=f"stdlib-{kind}-{split}-{sysconfig.get_python_version()}",
        )
        for split in SPLITS
    })


def load_text_dataset(name: str, data_files: dict | str | None = None, cache_dir: str | None = None) -> DatasetDict:
    """Raw text documents ("text" column) with train/validation/test splits."""
    if name == "stdlib-prose":
        return load_stdlib_corpus("prose", cache_dir)
    if name == "stdlib-code":
        return load_stdlib_corpus("code", cache_dir)
    if name in ("wikitext-103", "wikitext-2"):
        raw = load_dataset("wikitext", f"{name}-raw-v1", cache_dir=cache_dir)
        return raw.filter(lambda row: bool(row["text"].strip()))
    if name == "text":
        files = _check_local_files(parse_data_files(data_files))
        for unit in ("document", "paragraph", "line"):
            raw = load_dataset("text", data_files=files, cache_dir=cache_dir, sample_by=unit)
            raw = raw.filter(lambda row: bool(row["text"].strip()))
            if ("validation" in raw and "test" in raw) or len(raw["train"]) >= MIN_SPLIT_UNITS:
                break
        if unit != "document":
            logger.warning("dataset 'text': fewer than %d documents, so train/validation/test are split by %s "
                           "(%d %ss)", MIN_SPLIT_UNITS, unit, len(raw["train"]), unit)
        if len(raw["train"]) < MIN_SPLIT_UNITS and not ("validation" in raw and "test" in raw):
            raise ValueError(f"dataset 'text': {files} holds only {len(raw['train'])} non-empty lines; at least "
                             f"{MIN_SPLIT_UNITS} are needed to carve validation and test splits (or give "
                             "data_files as train=...,validation=...,test=...)")
        return _ensure_splits(raw)
    raise ValueError(f"Unknown text dataset {name!r}; valid text datasets are {list(TEXT_DATASETS)}")


MIN_SPLIT_UNITS = 20  # documents (else paragraphs, else lines) needed to carve 5 % validation and 5 % test splits


def parse_data_files(data_files: dict | str | list | None) -> dict | str | list | None:
    """data_files as a path or glob, a list, a {split: paths} mapping, or "train=a.txt,validation=b.txt"."""
    if isinstance(data_files, str) and "=" in data_files:
        mapping = {}
        for part in data_files.split(","):
            split, _, path = part.partition("=")
            if split.strip() not in SPLITS or not path.strip():
                raise ValueError(f"data_files {data_files!r}: each entry must be split=path with split one of "
                                 f"{list(SPLITS)}; got {part!r}")
            mapping[split.strip()] = path.strip()
        if "train" not in mapping:
            raise ValueError(f"data_files {data_files!r} names no train file")
        return mapping
    return data_files


def _check_local_files(data_files: dict | str | list | None) -> dict | str | list:
    if not data_files:
        raise ValueError("dataset 'text' needs data_files (a path, a list of paths, or {split: paths})")
    paths = data_files.values() if isinstance(data_files, dict) else [data_files]
    for entry in paths:
        for path in [entry] if isinstance(entry, str) else entry:
            if not glob.glob(path):
                raise FileNotFoundError(f"data file {path!r} does not exist")
    return data_files


def _ensure_splits(raw: DatasetDict, seed: int = 0) -> DatasetDict:
    """Adds the validation/test splits a local data set lacks, 5 % each, carved from train."""
    if "validation" in raw and "test" in raw:
        return raw
    train = raw["train"]
    for given, missing in (("validation", "test"), ("test", "validation")):
        if given in raw:  # one held-out split given: carve only the other (5 %) from train
            carved = train.train_test_split(test_size=0.05, seed=seed)
            return DatasetDict({"train": carved["train"], given: raw[given], missing: carved["test"]})
    held_out = train.train_test_split(test_size=0.1, seed=seed)
    halves = held_out["test"].train_test_split(test_size=0.5, seed=seed)
    return DatasetDict({"train": held_out["train"], "validation": halves["train"], "test": halves["test"]})


# ---- tokenizer and packing ------------------------------------------------------------------------------------

def train_bpe_tokenizer(texts: Dataset, vocab_size: int, save_dir: str | os.PathLike | None = None):
    """Byte-level BPE trained on the given documents, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if save_dir is not None and (Path(save_dir) / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(save_dir)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        (row["text"] for row in texts), vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def tokenize_documents(raw: DatasetDict, tokenizer, num_proc: int | None = None) -> DatasetDict:
    """Token ids per document, each followed by the end-of-text token (documents never run into each other
    without a separator)."""
    eos = tokenizer.eos_token_id

    def encode(batch):
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    return raw.map(encode, batched=True, remove_columns=raw["train"].column_names, num_proc=num_proc,
                   desc="tokenizing")


def pack_blocks(tokenized: DatasetDict, block_size: int) -> DatasetDict:
    """Concatenates each split's tokens and cuts them into blocks of block_size (the remainder is dropped)."""

    def group(batch):
        flat = [token for ids in batch["input_ids"] for token in ids]
        usable = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    return tokenized.map(group, batched=True, batch_size=1000, remove_columns=["input_ids"], desc="packing")


def concatenated_tokens(tokenized_split: Dataset) -> np.ndarray:
    return np.fromiter((t for ids in tokenized_split["input_ids"] for t in ids), dtype=np.int64)


# ---- images ---------------------------------------------------------------------------------------------------

def _digits_rows(split: str) -> Iterator[dict]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    cut_validation, cut_test = int(0.8 * len(order)), int(0.9 * len(order))
    chosen = {"train": order[:cut_validation], "validation": order[cut_validation:cut_test],
              "test": order[cut_test:]}[split]
    for index in chosen:
        image = (digits.images[index] / 16.0 - 0.5) / 0.5  # [8, 8] in [-1, 1]
        yield {"pixel_values": image[None].astype(np.float32).tolist(), "labels": int(digits.target[index])}


def image_processor(image_size: int, channels: int):
    """The ViTImageProcessor that does what training did to an 8-bit image: resize to image_size, scale to [0, 1],
    normalise to [-1, 1]. Saved with every ViT run, so `AutoImageProcessor` and (for RGB models) `pipeline` work on
    the output folder. pipeline() converts every image to RGB, so a 1-channel model (digits) takes the processor
    directly on a grayscale image."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * channels,
                             image_std=[0.5] * channels, do_convert_rgb=channels == 3)


def load_image_dataset(name: str, data_dir: str | None = None, cache_dir: str | None = None,
                       image_size: int | None = None) -> tuple[DatasetDict, int, int]:
    """(dataset with "pixel_values" [C, S, S] floats in [-1, 1] and "labels", number of labels, channels)."""
    if name == "digits":
        dataset = DatasetDict({
            split: Dataset.from_generator(_digits_rows, gen_kwargs={"split": split}, cache_dir=cache_dir,
                                          config_name=f"digits-{split}")
            for split in SPLITS
        })
        return dataset.with_format("torch"), 10, 1
    if name in ("cifar10", "cifar100"):
        raw = load_dataset(name, cache_dir=cache_dir)
        image_column = "img"
        label_column = "label" if name == "cifar10" else "fine_label"
        held_out = raw["train"].train_test_split(test_size=0.1, seed=0)
        raw = DatasetDict({"train": held_out["train"], "validation": held_out["test"], "test": raw["test"]})
        num_labels = raw["train"].features[label_column].num_classes
    elif name == "imagefolder":
        if not data_dir or not Path(data_dir).is_dir():
            raise FileNotFoundError(f"dataset 'imagefolder' needs an existing data_dir; got {data_dir!r}")
        raw = _ensure_splits(load_dataset("imagefolder", data_dir=data_dir, cache_dir=cache_dir))
        image_column, label_column = "image", "label"
        num_labels = raw["train"].features[label_column].num_classes
    else:
        raise ValueError(f"Unknown image dataset {name!r}; valid image datasets are {list(IMAGE_DATASETS)}")

    def to_arrays(batch):
        pixels = []
        for image in batch[image_column]:
            image = image.convert("RGB")
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size))
            array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
            pixels.append(((array - 0.5) / 0.5).tolist())
        return {"pixel_values": pixels, "labels": batch[label_column]}

    columns = raw["train"].column_names
    dataset = raw.map(to_arrays, batched=True, remove_columns=columns, desc="images to arrays")
    return dataset.with_format("torch"), num_labels, 3
