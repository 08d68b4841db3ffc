"""Expressive Attention (Gros, arXiv 2407.18601): weights from the squared dot product, normalised over keys.

    s_ij = q_i . k_j (times 1/sqrt(d_h) when scale=True)
    a_ij = f(s_ij) / sum_j f(s_ij)
    f(s) = s^2 / (1 + s^2)      form="rational"  (the public re-implementation; default)
         = s^2                  form="square"
         = exp(s^2)             form="softmax_square"  (softmax of s^2)

Large for parallel and antiparallel query/key, small for orthogonal ones. The mask acts after f (a masked key gets
weight exactly 0) and a row with no positive f gets zero weights, never NaN. No parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import KeyMask, check_bool, check_choice, normalize_over_keys

EXPRESSIVE_FORMS = ("rational", "square", "softmax_square")


class ExpressiveAttention(nn.Module):
    name = "expressive"
    default_layers = "all"

    def __init__(self, num_heads: int, head_dim: int, *, form: str = "rational", scale: bool = False) -> None:
        super().__init__()
        check_choice("form", form, EXPRESSIVE_FORMS)
        check_bool("scale", scale)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.form = form
        self.scale = scale

    def reset_parameters(self) -> None:
        """No parameters."""

    @property
    def options(self) -> dict:
        return {"form": self.form, "scale": self.scale}

    def attention_weights(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float) -> torch.Tensor:
        # Scores and f in float32 at least: s^2 overflows half precision long before fp32.
        compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        scores = torch.matmul(query.to(compute_dtype), key.to(compute_dtype).transpose(-1, -2))  # [B, H, Lq, Lk]
        if self.scale:
            scores = scores * scaling
        squared = scores.square()
        if self.form == "rational":
            values = squared / (1.0 + squared)
        elif self.form == "square":
            values = squared
        else:  # softmax_square: exp(s^2 - row max) keeps the exponential finite; the shift cancels in the ratio
            row_max = squared if mask.keep is None else squared.masked_fill(~mask.keep, float("-inf"))
            row_max = row_max.amax(dim=-1, keepdim=True).clamp_min(0.0).detach()
            values = torch.exp(squared - row_max)
        return normalize_over_keys(values, mask)
