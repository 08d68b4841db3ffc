"""Dot-product attention, the control arm: softmax(q . k * scaling).

Same numbers as Transformers' eager implementation, so every comparison against the other variants changes only
the score/weight rule.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import FAST_PATHS, KeyMask, flex_inference_output, masked_softmax


class DotProductAttention(nn.Module):
    name = "dot"
    default_layers = "all"

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim

    def reset_parameters(self) -> None:
        """No parameters."""

    @property
    def options(self) -> dict:
        return {}

    def attention_weights(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float) -> torch.Tensor:
        # query [B, H, Lq, D], key [B, H, Lk, D] -> weights [B, H, Lq, Lk]
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        return masked_softmax(scores, mask)

    def attention_output(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: KeyMask, scaling: float,
        dropout: float, training: bool,
    ) -> tuple[torch.Tensor, None] | None:
        """Only with FAST_PATHS.flex_inference: compiled FlexAttention for inference. Otherwise None (the plain path,
        which equals Transformers' eager attention, runs)."""
        if not (FAST_PATHS.enabled and FAST_PATHS.flex_inference):
            return None
        if query.shape[2] * key.shape[2] < FAST_PATHS.min_size:
            return None

        def score_mod(score, batch, head, query_index, key_index):
            return score * scaling

        output = flex_inference_output(query, key, value, mask, score_mod, dropout, training, fully_masked="uniform")
        return None if output is None else (output, None)
