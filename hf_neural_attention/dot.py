"""Dot-product attention, the control arm: softmax(q . k * scaling).

Same numbers as Transformers' eager implementation, so every comparison against the other variants changes only
the score/weight rule. No chunked path (SDPA is the fast dot product); FlexAttention for inference when enabled.
"""

from __future__ import annotations

from typing import Callable

import torch

from .masks import Chunk
from .variant import AttentionVariant, grouped_matmul


class DotProductAttention(AttentionVariant):
    name = "dot"
    normalisation = "softmax"
    has_chunked_path = False
    flex_fully_masked = "uniform"  # the plain softmax over the dtype's minimum gives a fully masked row uniform weights

    def score(self, rows: list[torch.Tensor], shared: list[torch.Tensor], chunk: Chunk, scaling: float) -> torch.Tensor:
        query_rows, keys = rows[0], shared[0][:, :, : chunk.key_end]  # [B, H, rows, D], [B, H, keys, D]
        return grouped_matmul(query_rows, keys.transpose(-1, -2)) * scaling  # [B, H, rows, keys]

    def flex_score_mod(self, scaling: float) -> Callable:
        def score_mod(score, batch, head, query_index, key_index):
            return score * scaling

        return score_mod
