"""Metrics reported through `evaluate`, as local metric modules (the Hub's metric scripts cannot be fetched here).

- accuracy: fraction of predictions equal to the references.
- perplexity: exp(mean token negative log-likelihood), from per-token losses.
`sliding_window_perplexity` evaluates a long token stream with a documented stride: windows of at most `block_size`
tokens, each scoring the next `stride` tokens with up to block_size - stride tokens of context before them, so
every token after the first is scored exactly once.
"""

from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np
import torch


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the references.",
            citation="",
            inputs_description="predictions and references: integer class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {"accuracy": float((predictions == references).mean())}


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="exp of the mean per-token negative log-likelihood (natural log).",
            citation="",
            inputs_description="token_losses: per-token negative log-likelihoods",
            features=datasets.Features({"token_losses": datasets.Value("float64")}),
        )

    def _compute(self, token_losses):
        mean = float(np.mean(token_losses))
        return {"perplexity": math.exp(mean), "mean_token_loss": mean}


def accuracy_metric() -> evaluate.Metric:
    return Accuracy()


def perplexity_metric() -> evaluate.Metric:
    return Perplexity()


def compute_accuracy_from_eval_prediction(eval_prediction) -> dict:
    """`compute_metrics` for the Trainer on classification."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return accuracy_metric().compute(predictions=np.argmax(logits, axis=-1), references=labels)


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor, scored_from: int) -> torch.Tensor:
    """Per-token losses of input_ids[:, scored_from + 1:] predicted from their prefixes. input_ids: [1, L]."""
    logits = model(input_ids=input_ids).logits[0, :-1].float()  # [L - 1, V]
    targets = input_ids[0, 1:]
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return losses[scored_from:]


@torch.no_grad()
def sliding_window_perplexity(model, tokens: np.ndarray | torch.Tensor, block_size: int, stride: int | None = None,
                              max_tokens: int | None = None) -> dict:
    """Perplexity of a token stream scored through windows of at most block_size tokens.

    Each window scores the next `stride` tokens (default block_size // 2), and holds up to block_size - stride
    earlier tokens as context, so every token after the first is scored exactly once. stride must be at most
    block_size - 1 (a token is predicted from the token before it, which must be in the same window).
    """
    stride = max(1, block_size // 2) if stride is None else stride
    if not 0 < stride < block_size:
        raise ValueError(f"stride must be in 1..block_size - 1 ({block_size - 1}); got {stride}")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to compute a perplexity")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    metric = perplexity_metric()
    scored_until = 1  # token 0 has no prefix and is never scored
    while scored_until < len(tokens):
        end = min(scored_until + stride, len(tokens))  # this window scores tokens scored_until..end-1
        start = max(0, end - block_size)
        window = tokens[start:end][None].to(device)
        losses = token_losses(model, window, scored_from=scored_until - start - 1)
        metric.add_batch(token_losses=losses.double().cpu().numpy())
        scored_until = end
    model.train(was_training)
    result = metric.compute()
    result["tokens_scored"] = len(tokens) - 1
    return result


@torch.no_grad()
def block_perplexity(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """exp(mean token loss) over independent blocks [N, L] of token ids (every block scores its L - 1 next-token
    predictions; no context crosses blocks), `batch_size` blocks at a time. The evaluation of the reproductions that
    score fixed-length windows (extrapolation lengths, test blocks)."""
    blocks = torch.as_tensor(blocks, dtype=torch.long)
    if blocks.dim() != 2 or blocks.shape[1] < 2 or len(blocks) == 0:
        raise ValueError(f"blocks must be [N >= 1, L >= 2] token ids; got shape {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        total += float(model(input_ids=ids, labels=ids).loss) * len(ids)
    model.train(was_training)
    return math.exp(total / len(blocks))
