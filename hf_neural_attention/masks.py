"""Masks as the variants see them: the mask Transformers hands an attention function, split into a boolean keep
pattern and an additive bias; query/key slots for relative positions; and the row chunks of a score map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def restrict_to_window(mask: KeyMask, q_len: int, k_len: int, window: int, device: torch.device) -> KeyMask:
    """The mask with sliding-window attention applied: a query sees only keys less than `window` slots behind it
    (Transformers' rule, kv_idx > q_idx - window), with slots as in query_key_slots, so cached decoding, padding and
    a mask that is already banded all come out the same."""
    query_slots, key_slots = query_key_slots(mask, q_len, k_len, device)
    band = (query_slots - key_slots) < window  # [B or 1, 1, Lq, Lk]
    keep = band if mask.keep is None else mask.keep & band
    return KeyMask(keep, mask.bias, mask.causal)


class Chunk:
    """Query rows start:end against keys :key_end. Columns before mask_from are visible to every row of the chunk;
    keep is the boolean pattern of the columns mask_from:key_end (None when every column is visible) and bias the
    additive bias of all :key_end columns (None when there is none)."""

    __slots__ = ("start", "end", "key_end", "mask_from", "keep", "bias")

    def __init__(self, start: int, end: int, key_end: int, mask_from: int, keep: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        self.start, self.end, self.key_end, self.mask_from, self.keep, self.bias = (
            start, end, key_end, mask_from, keep, bias)

    def mask_columns(self, tensor: torch.Tensor) -> torch.Tensor:
        """The view of a [.., rows, key_end] tensor on the columns where the chunk has masked positions."""
        return tensor[..., self.mask_from :]

    def rows_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of a tensor indexed by query along dim 2 (a size-1 dim 2 is shared by every row)."""
        return tensor if tensor.shape[2] == 1 else tensor[:, :, self.start : self.end]


def whole_map(mask: KeyMask, q_len: int, k_len: int) -> Chunk:
    """The whole score map as one chunk: what the plain path computes."""
    return Chunk(0, q_len, k_len, 0, mask.keep, mask.bias)


def _rows_of(tensor: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    if tensor is None or tensor.shape[-2] == 1:
        return tensor
    return tensor[:, :, start:end]


def make_chunks(mask: KeyMask, q_len: int, k_len: int, rows: int) -> list[Chunk]:
    """The row chunks of a map. The key extent stops after the last key any row of the chunk may see; keys past it are
    masked for the whole chunk, so leaving them out changes nothing (their weights are exactly 0, and for cdape's
    convolution a masked key is a zero, like the padding past the end). A chunk holding a fully masked row keeps every
    key: the plain path gives such a row uniform softmax weights over all keys."""
    chunks = []
    for start in range(0, q_len, rows):
        end = min(q_len, start + rows)
        bias = _rows_of(mask.bias, start, end)
        keep = _rows_of(mask.keep, start, end)
        key_end, mask_from = k_len, k_len
        if keep is not None:
            if bool(keep.any(dim=-1).all()):
                visible = keep.flatten(0, -2).any(dim=0).nonzero()
                key_end = int(visible[-1]) + 1
            hidden_somewhere = ~keep[..., :key_end].flatten(0, -2).all(dim=0)
            masked_columns = hidden_somewhere.nonzero()
            mask_from = int(masked_columns[0]) if len(masked_columns) else key_end
            keep = keep[..., mask_from:key_end] if mask_from < key_end else None
        if bias is not None:
            bias = bias[..., :key_end]
        chunks.append(Chunk(start, end, key_end, mask_from, keep, bias))
    return chunks
