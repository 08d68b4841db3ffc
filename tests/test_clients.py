"""Real clients of a saved variant checkpoint: Transformers' text-generation pipeline and lm-evaluation-harness
(`lm_eval --model hf --model_args pretrained=<folder>,trust_remote_code=True`), the latter on a local
rolling-perplexity task whose score must not depend on the batch size (issue 26 item 8)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import pipeline

from conftest import TINY_WORDS, converted, tiny_gpt2, tiny_word_tokenizer


def save_variant_checkpoint(folder, variant: str) -> None:
    """A tiny GPT-2 (128 positions) converted to `variant` with its added parameters moved off their init, saved
    with a word-level tokenizer: a folder as hfna-retrofit or Trainer writes it."""
    model = converted(tiny_gpt2, variant)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    tiny_word_tokenizer().save_pretrained(folder)


@pytest.mark.parametrize("variant", ["neural", "cdape"])
def test_text_generation_pipeline_on_a_variant_checkpoint(variant, tmp_path):
    save_variant_checkpoint(tmp_path / "ckpt", variant)
    generator = pipeline("text-generation", model=str(tmp_path / "ckpt"), trust_remote_code=True)
    assert type(generator.model).__name__ == "VariantGPT2LMHeadModel"
    assert generator.model.config.attention_variant == variant
    prompt = "the cat sat on the"
    text = generator(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text.split()) == len(prompt.split()) + 6, text
    # the same tokens as generate() on the model itself
    ids = generator.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = generator.model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert text == prompt + generator.tokenizer.decode(expected[0, ids.shape[1]:])


TASK_YAML = """\
task: hfna_local_rolling_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_local_task(folder) -> None:
    """A rolling-perplexity task over a local JSON-lines file: documents of 5 to 300 words (the longest span three
    128-token windows of the tiny model)."""
    rng = random.Random(0)
    lengths = [5, 12, 40, 90, 127, 300, 60, 17]
    with open(folder / "docs.jsonl", "w") as handle:
        for length in lengths:
            handle.write(json.dumps({"text": " ".join(rng.choice(TINY_WORDS) for _ in range(length))}) + "\n")
    (folder / "hfna_local.yaml").write_text(TASK_YAML.format(data=folder / "docs.jsonl"))


def direct_loglikelihood(folder, text: str) -> float:
    """log p(text) from the model itself for a document within one window: the tokens after the end-of-text token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(text).input_ids])
    with torch.no_grad():
        logits = model(ids).logits.double()
    return torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None]).sum().item()


@pytest.mark.slow  # lm-evaluation-harness in process, twice: ~20 s
def test_lm_eval_scores_a_variant_checkpoint_the_same_at_every_batch_size(tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra")
    from lm_eval.tasks import TaskManager

    save_variant_checkpoint(tmp_path / "ckpt", "cdape")
    write_local_task(tmp_path)
    scores, samples = {}, {}
    for batch_size in (1, 4):
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={tmp_path / 'ckpt'},trust_remote_code=True",
            tasks=["hfna_local_rolling_perplexity"], task_manager=TaskManager(include_path=str(tmp_path)),
            batch_size=batch_size, device="cpu", log_samples=True, bootstrap_iters=0,
        )
        metrics = results["results"]["hfna_local_rolling_perplexity"]
        scores[batch_size] = {name: metrics[f"{name},none"]
                              for name in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
        samples[batch_size] = results["samples"]["hfna_local_rolling_perplexity"]
    assert all(math.isfinite(value) and value > 0 for value in scores[1].values())
    for name, value in scores[1].items():
        assert scores[4][name] == pytest.approx(value, rel=1e-5), (name, scores)
    # a document within one window scores what the model itself gives it
    short = next(s for s in samples[1] if len(s["doc"]["text"].split()) == 40)
    loglikelihood = short["filtered_resps"][0]
    loglikelihood = loglikelihood[0] if isinstance(loglikelihood, (list, tuple)) else loglikelihood
    assert float(loglikelihood) == pytest.approx(direct_loglikelihood(tmp_path / "ckpt", short["doc"]["text"]),
                                                 rel=1e-4)
