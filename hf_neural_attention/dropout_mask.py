"""Attention dropout as a function of position: one mask per call, the same on every path and for every layout.

Whether weight (batch b, head h, query row i, key column j) is kept depends only on the call's seed and (b, h, i, j),
through a counter-based integer hash, so the plain path, the chunked engine (any chunk size) and the Triton kernels
(any tile) draw the same mask, and a recompute under other settings (activation checkpointing) draws it again.

    mix(x)      = x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15   (uint32, wrapping)
    stream(b,h) = mix(mix(seed_lo ^ mix(seed_hi)) ^ (b * H + h))
    row_key     = mix(stream(b, h) ^ i)
    keep        = mix(row_key ^ j) >= threshold,   threshold = round(p * 2^32)   (unsigned comparison)

Kept weights are scaled by 1 / (1 - p), as nn.functional.dropout does. Here the hash runs on int32 tensors whose
multiplication wraps like uint32 (the shifts are made logical by masking); the kernels compute it on uint32.
"""

from __future__ import annotations

import torch

MIX_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)  # both < 2^31: valid int32 scalars
_SIGN_BIT = -(2**31)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The hash above on an int32 tensor (a fresh tensor; bits as uint32)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    return _mix_tail_(x)


def _mix_tail_(x: torch.Tensor) -> torch.Tensor:
    """mix32 after its first xor-shift, in place."""
    x.mul_(MIX_MULTIPLIERS[0])
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    x.mul_(MIX_MULTIPLIERS[1])
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    return x


def _as_int32(values: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """One 62-bit seed per attention call, an int64 tensor drawn from the device's global generator without a host
    sync (torch.manual_seed makes training reproducible; checkpointing restores the RNG state, so a recompute draws
    the same seed)."""
    return torch.randint(0, 2**62, (), device=device, dtype=torch.int64)


def dropout_streams(seed: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """int32 [B, H]: the stream key of every (batch, head) pair, from the full 62-bit seed."""
    seed_lo = _as_int32(seed & 0xFFFFFFFF)
    seed_hi = _as_int32(seed >> 32)
    base = mix32(seed_lo ^ mix32(seed_hi))
    pairs = torch.arange(batch * heads, device=seed.device, dtype=torch.int32).view(batch, heads)
    return mix32(base ^ pairs)


def keep_threshold(p: float) -> int:
    """The uint32 threshold a hash value must reach to keep its weight: P(keep) = 1 - p (within 2^-32)."""
    return min(2**32 - 1, round(p * 2**32))


def dropout_keep(streams: torch.Tensor, row_start: int, row_end: int, key_end: int, p: float) -> torch.Tensor:
    """bool [B, H, row_end - row_start, key_end]: which weights of query rows row_start:row_end against keys :key_end
    are kept (True) under dropout probability p."""
    device = streams.device
    rows = torch.arange(row_start, row_end, device=device, dtype=torch.int32)
    columns = torch.arange(key_end, device=device, dtype=torch.int32)
    row_keys = mix32(streams[:, :, None] ^ rows)  # [B, H, rows]
    hashed = row_keys[..., None] ^ columns  # [B, H, rows, key_end]
    hashed.bitwise_xor_((hashed >> 16) & 0xFFFF)
    _mix_tail_(hashed)
    # unsigned hashed >= threshold  <=>  signed (hashed ^ sign bit) >= threshold - 2^31
    return hashed.bitwise_xor_(_SIGN_BIT) >= keep_threshold(p) + _SIGN_BIT


def dropout_scale(streams: torch.Tensor, row_start: int, row_end: int, key_end: int, p: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, H, rows, key_end] in dtype: 0 where dropped, 1 / (1 - p) where kept."""
    if p >= 1.0:  # everything dropped, as nn.functional.dropout(p=1) does
        return torch.zeros(*streams.shape, row_end - row_start, key_end, device=streams.device, dtype=dtype)
    keep = dropout_keep(streams, row_start, row_end, key_end, p)
    return keep.to(dtype).mul_(1.0 / (1.0 - p))
