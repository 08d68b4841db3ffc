"""Shared tensor helpers for every attention variant: masks, head repetition, normalisation.

This file is part of the flat folder that saved checkpoints copy for `trust_remote_code`, so it imports only
torch and its siblings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, L, D] -> [B, H_kv * n_rep, L, D], each kv head repeated for its group of query heads."""
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, length, head_dim)


@dataclass
class KeyMask:
    """An attention mask split into what the variants need.

    keep: bool [B or 1, H or 1, Lq, Lk], True where the query may attend the key; None means "attend everything".
    bias: float [B or 1, H or 1, Lq, Lk], finite additive log-domain bias on kept positions; None means zero.
    causal: whether the mask came from (or stands for) a causal pattern, so a query's own slot is its last
        visible key.
    """

    keep: torch.Tensor | None
    bias: torch.Tensor | None
    causal: bool


def causal_keep(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """bool [1, 1, Lq, Lk]: bottom-right aligned causal pattern (the queries are the last Lq key slots)."""
    query_slots = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    key_slots = torch.arange(k_len, device=device)[None, :]
    return (key_slots <= query_slots)[None, None]


def split_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, k_len: int, is_causal: bool, device: torch.device
) -> KeyMask:
    """Turns the mask Transformers hands an attention function into (keep, bias).

    Accepted: None, a boolean mask (True = attend) or an additive float mask (0 = attend, the dtype's minimum or -inf =
    masked, any other finite value = a bias), broadcastable to [B, H, Lq, Lk]. A None mask on a causal module with
    several queries is never read as "no mask": the causal pattern is rebuilt, so causality cannot be lost silently.
    """
    if attention_mask is None:
        if is_causal and q_len > 1:
            return KeyMask(causal_keep(q_len, k_len, device), None, True)
        return KeyMask(None, None, is_causal)

    if attention_mask.dim() != 4 or attention_mask.shape[-1] != k_len or attention_mask.shape[-2] not in (1, q_len):
        raise ValueError(
            f"attention_mask must be 4D and broadcastable to [batch, heads, {q_len}, {k_len}]; "
            f"got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype == torch.bool:
        return KeyMask(attention_mask, None, is_causal)
    if not attention_mask.is_floating_point():
        raise ValueError(
            f"attention_mask must be boolean (True = attend) or an additive float mask; got dtype {attention_mask.dtype}"
        )
    keep = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    bias = attention_mask.masked_fill(~keep, 0.0)
    if not bool(bias.any()):
        bias = None
    return KeyMask(keep, bias, is_causal)


def query_key_slots(mask: KeyMask, q_len: int, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute slot of every query and key, for relative-position maps |i - j|.

    Keys are the cache slots 0..Lk-1. A causal query sees exactly the keys up to its own slot, so its slot is the last
    visible key of its row; this holds for plain and cached decoding, chunked prefill and static caches alike. Without
    a causal mask the queries are the last Lq slots.
    Returns query slots [B or 1, 1, Lq, 1] and key slots [1, 1, 1, Lk], both int64.
    """
    key_slots = torch.arange(k_len, device=device)
    if mask.causal and mask.keep is not None:
        # Last True index per row; a fully masked row (a padding query) gets slot 0, its output is never used.
        last_visible = (mask.keep.any(dim=1, keepdim=True) * key_slots).amax(dim=-1)  # [B, 1, Lq]
        query_slots = last_visible[..., None]
    else:
        query_slots = torch.arange(k_len - q_len, k_len, device=device)[None, None, :, None]
    return query_slots, key_slots[None, None, None, :]


def masked_softmax(logits: torch.Tensor, mask: KeyMask) -> torch.Tensor:
    """softmax over keys of logits + bias, masked keys filled with the dtype's minimum (as Transformers' eager path).

    Computed in float32 (or float64 for float64 inputs) like the stock eager implementations; returns that dtype.
    """
    if mask.bias is not None:
        logits = logits + mask.bias
    if mask.keep is not None:
        logits = logits.masked_fill(~mask.keep, torch.finfo(logits.dtype).min)
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits, dim=-1, dtype=compute_dtype)


def normalize_over_keys(values: torch.Tensor, mask: KeyMask) -> torch.Tensor:
    """values / sum_keys values for non-negative values, masked keys exactly 0, applied after the nonlinearity.

    An additive bias b multiplies by exp(b), which is what adding b to the logits of softmax(log values) means. A row
    whose values are all zero (or all masked) gets all-zero weights instead of 0/0 = NaN.
    """
    if mask.bias is not None:
        values = values * torch.exp(mask.bias.to(values.dtype))
    if mask.keep is not None:
        values = values.masked_fill(~mask.keep, 0.0)
    row_sum = values.sum(dim=-1, keepdim=True)
    safe_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return values / safe_sum


def zero_masked(hidden: torch.Tensor, mask: KeyMask) -> torch.Tensor:
    """Zero every masked (query, key) position of a [B, C, Lq, Lk] map, as a convolution's zero padding would see it.

    The mask must be shared by all heads (a channel here is not a head), which is what Transformers builds.
    """
    if mask.keep is None:
        return hidden
    if mask.keep.shape[1] != 1:
        raise ValueError(
            f"this variant needs an attention mask shared by all heads (shape [batch, 1, Lq, Lk]); "
            f"got shape {tuple(mask.keep.shape)}"
        )
    return hidden.masked_fill(~mask.keep, 0.0)


def check_choice(option: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not valid; choose one of {list(choices)}")


def check_positive_int(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1; got {value!r}")


def check_bool(option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be True or False; got {value!r}")
