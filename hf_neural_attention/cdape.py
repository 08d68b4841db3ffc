"""CDAPE, "DAPE V2" (Zheng et al., arXiv 2410.04798, ACL 2025): a small CNN over the attention score map.

The [H, Lq, Lk] score tensor is an image whose channels are heads. Per layer:
    x = q . k * scaling                                   [B, H, Lq, Lk]
    P = positional bias maps (bias="alibi" or "kerple")     [B, H, Lq, Lk]; absent for bias="none"
    z = cat([x, P]) with masked positions set to 0          [B, H or 2H, Lq, Lk]
    y = Conv(1 x k) -> LeakyReLU -> Conv(1 x k), zero padding along the key axis
    a = softmax_j(x + P + y + mask)
The 1 x k kernels slide along keys only, so query rows never mix (which is what lets the engine chunk rows). Masked
positions (future keys and padding) are zeroed before EVERY convolution, not only the first: otherwise a masked
position's hidden activation is LeakyReLU(bias) != 0 and cached decoding or left padding would differ from the full
forward (the reference's tril on a one-row cached block has the same kind of bug). Relative positions come from
absolute key slots. The output convolution is zero-initialised by default, so with bias="none" a retrofit starts
exactly at the original model; zero_init=False gives PyTorch's default init, as in the reference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .masks import Chunk, KeyMask, query_key_slots
from .variant import (
    AttentionVariant, Option, boolean, choice, grouped_matmul, odd_positive_int, positive_int, tracked,
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


def conv_tensors(conv: nn.Module, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A convolution's weight and bias as tensors (the engine recomputes the convolutions per chunk, so it needs the
    tensors, not the module). A plain Conv2d gives its own. A wrapper with a `base_layer` Conv2d and
    `get_delta_weight(adapter)` (PEFT's LoRA) gives the base weight plus its active adapters' deltas: the same map as
    running the wrapper when its dropout is off. Any other wrapper is refused, so an adapter can never be skipped."""
    if type(conv) is nn.Conv2d:
        return conv.weight, conv.bias
    base, delta = getattr(conv, "base_layer", None), getattr(conv, "get_delta_weight", None)
    if not (isinstance(base, nn.Conv2d) and callable(delta)):
        raise ValueError(
            f"cdape reads its convolutions' weights directly, and {type(conv).__name__} wraps one in a way it cannot "
            "read (supported: nn.Conv2d, and LoRA adapters that expose base_layer and get_delta_weight, as PEFT's do)"
        )
    weight = base.weight
    if getattr(conv, "merged", False) or getattr(conv, "disable_adapters", False):
        return weight, base.bias  # merged: the deltas are in the base weight already
    for adapter in conv.active_adapters:
        if adapter not in getattr(conv, "lora_A", {}):
            continue
        if getattr(conv, "use_dora", {}).get(adapter, False):
            raise ValueError(f"cdape supports LoRA on its convolutions, not DoRA (adapter {adapter!r})")
        dropout = conv.lora_dropout[adapter]
        if training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise ValueError(
                f"LoRA adapter {adapter!r} on a cdape convolution has lora_dropout={dropout.p}; cdape applies adapters "
                "as weight deltas, which equals the adapter only without dropout: use lora_dropout=0 for these modules"
            )
        weight = weight + delta(adapter)
    return weight, base.bias


class CDAPEAttention(AttentionVariant):
    name = "cdape"
    normalisation = "softmax"
    has_parameters = True
    options_spec = {
        "kernel_size": Option(3, odd_positive_int, "width k of the 1 x k kernels along the key axis"),
        "hidden_size": Option(32, positive_int, "channels between the two convolutions"),
        "bias": Option("none", choice(*CDAPE_BIASES), "positional bias maps added to the scores and fed to the CNN"),
        "zero_init": Option(True, boolean, "zero-initialise the output convolution (a retrofit starts unchanged)"),
    }

    def build(self) -> None:
        in_channels = self.num_heads if self.bias == "none" else 2 * self.num_heads
        padding = (0, self.kernel_size // 2)
        self.conv_in = nn.Conv2d(in_channels, self.hidden_size, (1, self.kernel_size), padding=padding)
        self.activation = nn.LeakyReLU()
        self.conv_out = nn.Conv2d(self.hidden_size, self.num_heads, (1, self.kernel_size), padding=padding)
        if self.bias == "alibi":
            # Fixed slopes, rebuilt from num_heads on the fly: nothing to save, load or re-initialise.
            self.alibi_slopes = alibi_slopes(self.num_heads)
        elif self.bias == "kerple":
            # Kerple (log): P_ij = -r1 * log(1 + r2 |i - j|), learnable r1, r2 > 0 per head.
            self.kerple_r1 = nn.Parameter(torch.empty(self.num_heads))
            self.kerple_r2 = nn.Parameter(torch.empty(self.num_heads))

    def reset_parameters(self) -> None:
        self.conv_in.reset_parameters()
        self.conv_out.reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        if self.bias == "kerple":  # the reference's init: r1 ~ U(0, 2), r2 ~ U(0, 1)
            nn.init.uniform_(self.kerple_r1, 0.0, 2.0)
            nn.init.uniform_(self.kerple_r2, 0.0, 1.0)

    def prepare(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float):
        """Rows: the queries (and their slots); shared: the keys, the four conv tensors (and Kerple's r1, r2, the key
        slots)."""
        if mask.keep is not None and mask.keep.shape[1] != 1:
            raise ValueError(
                f"attention variant 'cdape' needs an attention mask shared by all heads (shape [batch, 1, Lq, Lk]; a "
                f"channel of its convolution is not a head); got shape {tuple(mask.keep.shape)}"
            )
        # The convolutions run in the inputs' dtype: autocast's where it is on (the attention function casts q, k, v
        # to it), float32 for float16 inputs (the engines upcast them, for range).
        weight_in, bias_in = conv_tensors(self.conv_in, self.training)
        weight_out, bias_out = conv_tensors(self.conv_out, self.training)
        dtype = query.dtype
        convs = [t.to(dtype) for t in (weight_in, bias_in, weight_out, bias_out)]
        if self.bias == "none":
            return [query], [key, *convs]
        query_slots, key_slots = query_key_slots(mask, query.shape[2], key.shape[2], query.device)
        kerple = [self.kerple_r1.to(dtype), self.kerple_r2.to(dtype)] if self.bias == "kerple" else []
        return [query, query_slots], [key, *convs, key_slots, *kerple]

    def position_bias(self, query_slots: torch.Tensor, key_slots: torch.Tensor, kerple: list[torch.Tensor],
                      dtype: torch.dtype) -> torch.Tensor:
        """Positional bias maps [B or 1, H, Lq, Lk] from query slots [B or 1, 1, Lq, 1] and key slots [1, 1, 1, Lk]."""
        distance = (query_slots - key_slots).abs().to(dtype)  # [B or 1, 1, Lq, Lk]
        if self.bias == "alibi":
            slopes = torch.tensor(self.alibi_slopes, dtype=dtype, device=distance.device)
            return -slopes[None, :, None, None] * distance
        r1 = kerple[0].clamp(min=KERPLE_MIN)[None, :, None, None]
        r2 = kerple[1].clamp(min=KERPLE_MIN)[None, :, None, None]
        return -r1 * torch.log1p(r2 * distance)

    def score(self, rows: list[torch.Tensor], shared: list[torch.Tensor], chunk: Chunk, scaling: float) -> torch.Tensor:
        """Logits x + P + CNN(z) of the chunk. The convolutions run on channels-last maps (several times faster on CPU
        than the default layout for these few channels), and masking multiplies the columns where the chunk has
        masked positions by a 0/1 map (a masked position becomes +-0, which the convolution reads as 0; a fill with
        a broadcast boolean mask is slow). Masked positions of the returned logits are arbitrary."""
        weight_in, bias_in, weight_out, bias_out = shared[1:5]
        inplace = not tracked(*rows, *shared)
        keys = shared[0][:, :, : chunk.key_end]
        scores = grouped_matmul(rows[0], keys.transpose(-1, -2)).to(weight_in.dtype).mul_(scaling)  # [B, H, rows, keys]
        logits = conv_input = scores
        if self.bias != "none":
            position = self.position_bias(rows[1], shared[5][..., : chunk.key_end], shared[6:], scores.dtype)
            position = position.expand(scores.shape[0], -1, -1, -1)
            logits = scores + position
            conv_input = torch.cat([scores, position], dim=1)  # [B, 2H, rows, keys]
        conv_input = conv_input.contiguous(memory_format=torch.channels_last)
        keep = None if chunk.keep is None else chunk.keep.to(scores.dtype)
        if keep is not None:
            chunk.mask_columns(conv_input).mul_(keep)
        padding = (0, self.kernel_size // 2)
        hidden = nn.functional.conv2d(conv_input, weight_in, bias_in, padding=padding)  # [B, D, rows, keys], NHWC
        # In place only without autograd: the in-place version's backward keeps its result, which is masked next.
        hidden = nn.functional.leaky_relu(hidden, self.activation.negative_slope, inplace=inplace)
        if keep is not None:
            chunk.mask_columns(hidden).mul_(keep)
        correction = nn.functional.conv2d(hidden, weight_out, bias_out, padding=padding)
        return logits.add_(correction) if inplace else logits + correction
