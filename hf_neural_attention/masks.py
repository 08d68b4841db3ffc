"""Masks as the variants see them: the mask Transformers hands an attention function, split into a boolean keep
pattern and an additive bias; query/key slots for relative positions; and the row chunks of a score map.
"""

from __future__ import annotations

import torch


class KeyMask:
    """An attention mask split into what the variants need.

    keep: bool [B or 1, H or 1, Lq, Lk], True where the query may attend the key; None means "attend everything".
        For a purely causal mask it is built from indices on first use (the chunked engine and the kernels never
        need it whole).
    bias: float [B or 1, H or 1, Lq, Lk], finite additive log-domain bias on kept positions; None means zero.
    causal: whether the mask came from (or stands for) a causal pattern, so a query's own slot is its last
        visible key.
    pure_causal: keep is exactly the bottom-right aligned causal pattern (no padding, no window, Lq <= Lk), as the
        way the mask was built says; never found by comparing an Lq x Lk tensor.
    """

    __slots__ = ("_keep", "bias", "causal", "pure_causal", "_shape")

    @property
    def pure_causal_device(self) -> torch.device:
        return self._shape[2]

    def __init__(self, keep: torch.Tensor | None, bias: torch.Tensor | None, causal: bool, *,
                 pure_causal: tuple[int, int, torch.device] | None = None) -> None:
        self._keep, self.bias, self.causal = keep, bias, causal
        self.pure_causal = pure_causal is not None
        self._shape = pure_causal

    @classmethod
    def causal_pattern(cls, q_len: int, k_len: int, device: torch.device) -> KeyMask:
        return cls(None, None, True, pure_causal=(q_len, k_len, device))

    @property
    def keep(self) -> torch.Tensor | None:
        if self._keep is None and self.pure_causal:
            self._keep = causal_keep(*self._shape)
        return self._keep


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
        if is_causal and 1 < q_len <= k_len:
            return KeyMask.causal_pattern(q_len, k_len, device)
        if is_causal and q_len > 1:  # more queries than keys: the first rows see nothing
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
    if mask.causal and not mask.pure_causal and mask.keep is not None:
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
    key: the plain path gives such a row uniform softmax weights over all keys.

    The extents of all chunks come from one vectorised pass over the mask and one transfer to the host (none for a
    purely causal mask, whose extents follow from the indices), however many chunks there are."""
    starts = range(0, q_len, rows)
    if mask.pure_causal:
        return [_causal_chunk(start, min(q_len, start + rows), q_len, k_len, mask) for start in starts]
    keep = mask.keep
    extents = [(k_len, k_len)] * len(starts) if keep is None else _chunk_extents(keep, q_len, k_len, rows)
    chunks = []
    for start, (key_end, mask_from) in zip(starts, extents):
        end = min(q_len, start + rows)
        chunk_keep = None
        if keep is not None and mask_from < key_end:
            chunk_keep = _rows_of(keep, start, end)[..., mask_from:key_end]
        bias = _rows_of(mask.bias, start, end)
        chunks.append(Chunk(start, end, key_end, mask_from, chunk_keep, None if bias is None else bias[..., :key_end]))
    return chunks


def _causal_chunk(start: int, end: int, q_len: int, k_len: int, mask: KeyMask) -> Chunk:
    """Rows start:end of the bottom-right causal pattern: row i sees keys j <= i + (Lk - Lq)."""
    offset = k_len - q_len
    key_end, mask_from = end + offset, start + offset + 1  # columns before mask_from are seen by every row
    keep = None
    if mask_from < key_end:
        device = mask.pure_causal_device
        query_slots = torch.arange(start + offset, end + offset, device=device)[:, None]
        keep = (torch.arange(mask_from, key_end, device=device)[None, :] <= query_slots)[None, None]
    return Chunk(start, end, key_end, min(mask_from, key_end), keep, None)


def _chunk_extents(keep: torch.Tensor, q_len: int, k_len: int, rows: int) -> list[tuple[int, int]]:
    """(key_end, mask_from) of every chunk of `rows` query rows, in one pass and one host transfer."""
    flat = keep.flatten(0, 1)  # [B*H or 1, Lq or 1, Lk]
    seen = flat.any(dim=0)  # [Lq or 1, Lk]: some batch/head row sees the key
    hidden = (~flat).any(dim=0)  # some batch/head row masks it
    every_row_sees = flat.any(dim=-1).all(dim=0)  # [Lq or 1]
    last_seen = k_len - 1 - seen.flip(-1).to(torch.uint8).argmax(dim=-1)
    last_seen = torch.where(seen.any(dim=-1), last_seen, -1)
    first_hidden = torch.where(hidden.any(dim=-1), hidden.to(torch.uint8).argmax(dim=-1), k_len)
    num_chunks = -(-q_len // rows)
    padding = num_chunks * rows - q_len

    def per_chunk(values: torch.Tensor, fill) -> torch.Tensor:  # [Lq or 1] -> [num_chunks, rows]
        values = values.expand(q_len)
        return torch.nn.functional.pad(values, (0, padding), value=fill).view(num_chunks, rows)

    chunk_sees = per_chunk(every_row_sees.to(torch.uint8), 1).amin(dim=-1).bool()
    key_end = torch.where(chunk_sees, per_chunk(last_seen, -1).amax(dim=-1) + 1, k_len)
    mask_from = torch.minimum(per_chunk(first_hidden, k_len).amin(dim=-1), key_end)
    return [tuple(pair) for pair in torch.stack([key_end, mask_from], dim=1).tolist()]
