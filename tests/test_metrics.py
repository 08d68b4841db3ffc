"""Metric values against hand-computed ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_neural_attention.experiments.metrics import (
    accuracy_metric,
    compute_accuracy_from_eval_prediction,
    perplexity_metric,
    sliding_window_perplexity,
)


def test_accuracy_by_hand():
    assert accuracy_metric().compute(predictions=[0, 1, 2, 3], references=[0, 1, 1, 0])["accuracy"] == 0.5

    class Prediction:
        predictions = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
        label_ids = np.array([1, 1, 1])

    assert compute_accuracy_from_eval_prediction(Prediction()) == {"accuracy": pytest.approx(2 / 3)}


def test_perplexity_by_hand():
    result = perplexity_metric().compute(token_losses=[math.log(2), math.log(8)])
    assert result["perplexity"] == pytest.approx(4.0)  # exp(mean(log 2, log 8)) = sqrt(16)


class BigramModel(torch.nn.Module):
    """Logits depend only on the current token, so every token's loss is known in closed form."""

    def __init__(self, vocab: int = 5):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))
        self.calls = []

    def forward(self, input_ids):
        self.calls.append(input_ids.shape[1])
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_sliding_window_scores_every_token_once():
    model = BigramModel()
    tokens = torch.randint(0, 5, (23,), generator=torch.Generator().manual_seed(1))
    log_probs = torch.log_softmax(model.table, dim=-1)
    expected = -log_probs[tokens[:-1], tokens[1:]].mean().item()
    for block, stride in [(8, 7), (8, 3), (8, 1), (30, 5)]:
        model.calls.clear()
        result = sliding_window_perplexity(model, tokens, block_size=block, stride=stride)
        assert result["tokens_scored"] == 22
        assert result["mean_token_loss"] == pytest.approx(expected, rel=1e-6), (block, stride)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
        assert max(model.calls) <= block
    model.calls.clear()
    sliding_window_perplexity(model, tokens, block_size=8, stride=4)
    assert model.calls == [5, 8, 8, 8, 8, 8]  # windows end at tokens 5, 9, 13, 17, 21, 23


def test_sliding_window_rejects_bad_stride():
    for stride in (4, 6, 0):
        with pytest.raises(ValueError, match="stride must be in 1..block_size - 1"):
            sliding_window_perplexity(BigramModel(), torch.arange(5), block_size=4, stride=stride)


@pytest.mark.slow
@pytest.mark.parametrize("model_class,config_class", [
    ("VariantGPT2LMHeadModel", "VariantGPT2Config"), ("VariantLlamaForCausalLM", "VariantLlamaConfig")])
def test_trainer_eval_loss_is_the_models_mean_token_loss(model_class, config_class, tmp_path):
    """Trainer divides the summed token loss by its own count of targets; for stock GPT-2 that count included
    position 0 of every row (n instead of n - 1 targets), so eval losses came out (n - 1) / n too low."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    import hf_neural_attention as hfna

    torch.manual_seed(0)
    sizes = ({"n_layer": 1, "n_embd": 32, "n_head": 2} if model_class.startswith("VariantGPT2") else
             {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64})
    model = getattr(hfna, model_class)(getattr(hfna, config_class)(
        vocab_size=50, bos_token_id=0, eos_token_id=0, attention_variant="expressive", **sizes)).eval()
    ids = torch.randint(0, 50, (6, 16), generator=torch.Generator().manual_seed(1))
    blocks = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    trainer = Trainer(model=model, data_collator=default_data_collator,
                      args=TrainingArguments(output_dir=str(tmp_path), report_to="none", per_device_eval_batch_size=6))
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=ids).loss)
    assert trainer.evaluate(blocks)["eval_loss"] == pytest.approx(expected, rel=1e-5)


class BigramLM(BigramModel):
    """BigramModel with the causal-LM interface block_perplexity uses (labels -> mean next-token loss)."""

    def forward(self, input_ids, labels=None):
        logits = self.table[input_ids]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return type("Out", (), {"logits": logits, "loss": loss})()


def test_block_perplexity_is_the_closed_form_and_independent_of_batching():
    from hf_neural_attention.experiments.metrics import block_perplexity

    model = BigramLM()
    blocks = torch.randint(0, 5, (7, 6), generator=torch.Generator().manual_seed(2))
    log_probs = torch.log_softmax(model.table, dim=-1)
    expected = math.exp(-log_probs[blocks[:, :-1], blocks[:, 1:]].mean().item())
    for batch_size in (1, 3, 32):
        assert block_perplexity(model, blocks, batch_size=batch_size) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="blocks must be"):
        block_perplexity(model, blocks[:, :1])
