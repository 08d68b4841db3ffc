"""CDAPE, "DAPE V2" (Zheng et al., arXiv 2410.04798, ACL 2025): a small CNN over the attention score map.

The [H, Lq, Lk] score tensor is an image whose channels are heads. Per layer:
    x = q . k * scaling                                   [B, H, Lq, Lk]
    P = positional bias maps (bias="alibi" or "kerple")     [B, H, Lq, Lk]; absent for bias="none"
    z = cat([x, P]) with masked positions set to 0          [B, H or 2H, Lq, Lk]
    y = Conv(1 x k) -> LeakyReLU -> Conv(1 x k), zero padding along the key axis
    a = softmax_j(x + P + y + mask)
The 1 x k kernels slide along keys only, so query rows never mix. Masked positions (future keys and padding) are
zeroed before EVERY convolution, not only the first: otherwise a masked position's hidden activation is
LeakyReLU(bias) != 0 and cached decoding or left padding would differ from the full forward (the reference's tril
on a one-row cached block has the same kind of bug). Relative positions come from absolute key slots.
The output convolution is zero-initialised by default, so with bias="none" a retrofit starts exactly at the
original model; zero_init=False gives PyTorch's default init, as in the reference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import (
    ChunkPlan,
    KeyMask,
    check_bool,
    check_choice,
    check_positive_int,
    chunk_rows,
    chunked_attention,
    fast_path_applies,
    masked_softmax,
    query_key_slots,
    Chunk,
    zero_masked,
)

CDAPE_BIASES = ("none", "alibi", "kerple")
KERPLE_MIN = 1e-2  # the reference clamps r1, r2 to stay positive


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """ALiBi's fixed per-head slopes (Press et al.): geometric from 2^(-8/n), interleaved for non-powers of two."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (index + 1) for index in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two_slopes(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return tuple(slopes)


class CDAPEAttention(nn.Module):
    name = "cdape"
    default_layers = "all"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        kernel_size: int = 3,
        hidden_size: int = 32,
        bias: str = "none",
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd so the convolution is centred on each key; got {kernel_size}"
            )
        check_positive_int("hidden_size", hidden_size)
        check_choice("bias", bias, CDAPE_BIASES)
        check_bool("zero_init", zero_init)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kernel_size = kernel_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.zero_init = zero_init

        in_channels = num_heads if bias == "none" else 2 * num_heads
        padding = (0, kernel_size // 2)
        self.conv_in = nn.Conv2d(in_channels, hidden_size, (1, kernel_size), padding=padding)
        self.activation = nn.LeakyReLU()
        self.conv_out = nn.Conv2d(hidden_size, num_heads, (1, kernel_size), padding=padding)
        if bias == "alibi":
            # Fixed slopes, rebuilt from num_heads on the fly: nothing to save, load or re-initialise.
            self.alibi_slopes = alibi_slopes(num_heads)
        elif bias == "kerple":
            # Kerple (log): P_ij = -r1 * log(1 + r2 |i - j|), learnable r1, r2 > 0 per head.
            self.kerple_r1 = nn.Parameter(torch.empty(num_heads))
            self.kerple_r2 = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv_in.reset_parameters()
        self.conv_out.reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        if self.bias == "kerple":  # the reference's init: r1 ~ U(0, 2), r2 ~ U(0, 1)
            nn.init.uniform_(self.kerple_r1, 0.0, 2.0)
            nn.init.uniform_(self.kerple_r2, 0.0, 1.0)

    @property
    def options(self) -> dict:
        return {
            "kernel_size": self.kernel_size,
            "hidden_size": self.hidden_size,
            "bias": self.bias,
            "zero_init": self.zero_init,
        }

    def position_bias(self, mask: KeyMask, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """Positional bias maps [B or 1, H, Lq, Lk] from |query slot - key slot|."""
        query_slots, key_slots = query_key_slots(mask, q_len, k_len, device)
        return self.bias_from_slots(query_slots, key_slots, self.kerple_parameters())

    def kerple_parameters(self) -> list[torch.Tensor]:
        return [self.kerple_r1, self.kerple_r2] if self.bias == "kerple" else []

    def bias_from_slots(
        self, query_slots: torch.Tensor, key_slots: torch.Tensor, kerple: list[torch.Tensor]
    ) -> torch.Tensor:
        """Positional bias maps [B or 1, H, Lq, Lk] from query slots [B or 1, 1, Lq, 1] and key slots [1, 1, 1, Lk]."""
        distance = (query_slots - key_slots).abs().to(self.conv_in.weight.dtype)  # [B or 1, 1, Lq, Lk]
        if self.bias == "alibi":
            slopes = torch.tensor(self.alibi_slopes, dtype=distance.dtype, device=distance.device)
            return -slopes[None, :, None, None] * distance
        r1 = kerple[0].clamp(min=KERPLE_MIN)[None, :, None, None]
        r2 = kerple[1].clamp(min=KERPLE_MIN)[None, :, None, None]
        return -r1 * torch.log1p(r2 * distance)

    def logits(
        self, scores: torch.Tensor, position: torch.Tensor | None, keep: torch.Tensor | None,
        conv_parameters: list[torch.Tensor],
    ) -> torch.Tensor:
        """x + P + CNN(z) before masking, [B, H, Lq, Lk], from the scaled scores x and the bias maps P (or None)."""
        weight_in, bias_in, weight_out, bias_out = conv_parameters
        mask = KeyMask(keep, None, False)
        logits = scores
        conv_input = scores
        if position is not None:
            position = position.expand(scores.shape[0], -1, -1, -1)
            logits = scores + position
            conv_input = torch.cat([scores, position], dim=1)  # [B, 2H, Lq, Lk]
        padding = (0, self.kernel_size // 2)
        hidden = nn.functional.conv2d(zero_masked(conv_input, mask), weight_in, bias_in, padding=padding)  # [B, D, ..]
        hidden = zero_masked(self.activation(hidden), mask)
        return logits + nn.functional.conv2d(hidden, weight_out, bias_out, padding=padding)  # [B, H, Lq, Lk]

    def chunk_logits(
        self, scores: torch.Tensor, position: torch.Tensor | None, chunk: Chunk, conv_parameters: list[torch.Tensor]
    ) -> torch.Tensor:
        """logits() of one chunk for the fast path, same numbers: the convolutions run on channels-last maps (several
        times faster on CPU than the default layout for these few channels), and masking multiplies the columns
        where the chunk has masked positions by a 0/1 map (a masked position becomes +-0, which the convolution reads
        as 0; a fill with a broadcast boolean mask is slow). Masked positions of the returned logits are arbitrary
        (the caller masks them). Works in place where autograd allows it."""
        weight_in, bias_in, weight_out, bias_out = conv_parameters
        grad_mode = torch.is_grad_enabled()
        logits = scores
        conv_input = scores
        if position is not None:
            position = position.expand(scores.shape[0], -1, -1, -1)
            logits = scores + position
            conv_input = torch.cat([scores, position], dim=1)  # [B, 2H, rows, keys]
        conv_input = conv_input.contiguous(memory_format=torch.channels_last)
        keep_float = None if chunk.keep is None else chunk.keep.to(scores.dtype)
        if keep_float is not None:
            chunk.mask_columns(conv_input).mul_(keep_float)
        padding = (0, self.kernel_size // 2)
        hidden = nn.functional.conv2d(conv_input, weight_in, bias_in, padding=padding)  # [B, D, rows, keys], NHWC
        # In place only without autograd: the in-place version's backward keeps its result, which is masked next.
        hidden = nn.functional.leaky_relu(hidden, self.activation.negative_slope, inplace=not grad_mode)
        if keep_float is not None:
            chunk.mask_columns(hidden).mul_(keep_float)
        correction = nn.functional.conv2d(hidden, weight_out, bias_out, padding=padding)
        return logits.add_(correction)

    def conv_parameters(self) -> list[torch.Tensor]:
        return [self.conv_in.weight, self.conv_in.bias, self.conv_out.weight, self.conv_out.bias]

    def attention_weights(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float) -> torch.Tensor:
        q_len, k_len = query.shape[2], key.shape[2]
        dtype = self.conv_in.weight.dtype
        scores = torch.matmul(query, key.transpose(-1, -2)).to(dtype) * scaling  # [B, H, Lq, Lk]
        position = None if self.bias == "none" else self.position_bias(mask, q_len, k_len, query.device)
        logits = self.logits(scores, position, mask.keep, self.conv_parameters())
        return masked_softmax(logits, mask)

    def attention_output(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: KeyMask, scaling: float,
        dropout: float, training: bool,
    ) -> tuple[torch.Tensor, None] | None:
        """Fast path, same numbers as attention_weights(...) @ value. The 1 x k kernels never mix query rows, so the
        scores, both convolutions (masked positions zeroed before each), the softmax and the product with the values
        run in query-row chunks; backward recomputes each chunk, so no [Lq, Lk] map (let alone the D-channel hidden
        map) is kept. None where it does not apply (the plain path runs)."""
        if not fast_path_applies(query, key, value, dropout, training, self.conv_in.weight):
            return None
        if mask.keep is not None and mask.keep.shape[1] != 1:
            return None  # the plain path raises the error about head-specific masks
        batch, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        query_slots = key_slots = None
        if self.bias != "none":
            query_slots, key_slots = query_key_slots(mask, q_len, k_len, query.device)
        kerple = self.kerple_parameters()

        def score(rows, shared, chunk):
            scores = torch.matmul(rows[0], shared[0][:, :, : chunk.key_end].transpose(-1, -2)) * scaling
            position = None
            if query_slots is not None:
                slots = query_slots if query_slots.shape[2] == 1 else query_slots[:, :, chunk.start : chunk.end]
                position = self.bias_from_slots(slots, key_slots[..., : chunk.key_end], shared[5:])
            return self.chunk_logits(scores, position, chunk, shared[1:5])

        plan = ChunkPlan(score, "softmax", mask, chunk_rows(batch, heads, k_len, q_len), 1)
        return chunked_attention(plan, value, [query], [key, *self.conv_parameters(), *kerple]), None
