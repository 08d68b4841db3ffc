"""Dot-product attention, the control arm: softmax(q . k * scaling).

Same numbers as Transformers' eager implementation, so every comparison against the other variants changes only
the score/weight rule.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import KeyMask, masked_softmax


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
