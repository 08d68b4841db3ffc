"""What the fused kernels need from a variant, by name: a variant's `kernel_inputs(...)` returns one of these (or
None where its kernels do not cover its options), and the kernel glue (triton_attention.py) reads only these fields,
never a variant's options or the layout of its `prepare`.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch


class ExpressiveKernelInputs(NamedTuple):
    """f(s) / sum_j f(s) with s = dot_scale * q.k."""

    form: str  # "rational", "square" or "softmax_square"
    dot_scale: float
    query: torch.Tensor  # [B, H, Lq, D]
    key: torch.Tensor  # [B, H, Lk, D]


class PairwiseMLPKernelInputs(NamedTuple):
    """softmax_j(MLP(query_part_i + key_part_j) [+ dot_scale * q.k]) with two hidden layers: the first layer's
    per-query part (its bias included) and per-key part, then hidden = act(W2 act(.) + b2), score = W3 hidden + b3."""

    query_part: torch.Tensor  # [B, H, Lq, h1]
    key_part: torch.Tensor  # [B, H, Lk, h1]
    hidden_weight: torch.Tensor  # [G, h2, h1], G = 1 (shared by all heads) or H (per head)
    hidden_bias: torch.Tensor  # [G, h2]
    out_weight: torch.Tensor  # [G, 1, h2]
    out_bias: torch.Tensor  # [G, 1]
    activation: str  # "relu" or "leaky_relu"
    add_dot: bool  # combine="add": the scaled dot product is added to the MLP's score
    dot_scale: float
    query: torch.Tensor  # [B, H, Lq, D], read only when add_dot
    key: torch.Tensor  # [B, H, Lk, D], read only when add_dot


KernelInputs = Union[ExpressiveKernelInputs, PairwiseMLPKernelInputs]
