"""NoPE: a model without rotary position embeddings (`use_rotary_embeddings=False` on a variant config), for
position-free models or ones whose only positional signal is a variant's bias (cdape `alibi` / `kerple`).
"""

from __future__ import annotations

import torch
from torch import nn


class NoRotaryEmbedding(nn.Module):
    """Stands in for a rotary embedding module and returns the identity rotation (cos = 1, sin = 0): NoPE."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*position_ids.shape, self.head_dim)  # [B, L, head_dim]
        return torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device)


def drop_rotary_embeddings(model: nn.Module) -> None:
    """Replaces every rotary embedding module of the model by NoRotaryEmbedding."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = [name for name, module in model.named_modules() if "RotaryEmbedding" in type(module).__name__]
    if not rotary:
        raise ValueError(f"use_rotary_embeddings=False but {type(model).__name__} has no rotary embedding module")
    for name in rotary:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, NoRotaryEmbedding(head_dim))
