"""The Triton path: the fused kernels (triton_kernels.py) run on a variant's named kernel inputs (kernel_inputs.py),
with an autograd Function around them.

`triton_attention_output(inputs, value, mask, dropout, seed)` returns the [B, H, Lq, D] output, or the reason the
kernels do not cover the call (dispatch.py says it once and the chunked path runs): dropout p >= 1, triton installed
but not importable. Variants without kernels say so themselves (neural: other MLP depths). Boolean masks and additive
float biases, relu and leaky_relu MLPs, grouped-query keys and values with fewer heads than the queries (H_KV
dividing H) all run in the kernels.
cdape stays on the chunked path: its convolution over the score map mixes neighbouring keys and all heads, so a tile
would need a halo of scores from every head, and the chunked engine already keeps its memory linear in n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import triton_kernels as kernels
from .dropout_mask import dropout_streams
from .kernel_inputs import ExpressiveKernelInputs, KernelInputs
from .masks import KeyMask
from .neural import LEAKY_SLOPE
from .triton_kernels import available  # noqa: F401 (Transformers ships a sibling with a checkpoint only when a
# line reads "from .<sibling> import"; "from . import" alone left triton_kernels.py out: tests/test_shipped_code.py)


class Tiles(NamedTuple):
    """One launch's tile: query rows x key columns per program, and warps per program."""

    block_m: int
    block_n: int
    num_warps: int


@dataclass
class KernelCall:
    """What one call hands the kernels besides q, k, v and the MLP tensors."""

    score: int
    add_dot: bool
    dot_scale: float
    keep: torch.Tensor | None  # int8, broadcastable to [B, H, Lq, Lk]; None: every key, or the causal pattern
    bias: torch.Tensor | None  # the mask's additive float bias, broadcastable to [B, H, Lq, Lk]; None: zero
    causal: bool  # the bottom-right causal pattern, computed in the kernels (tiles above the diagonal skipped)
    dropout: float
    streams: torch.Tensor | None  # int32 [B, H]: dropout_mask's stream key per (batch, head); None without dropout
    per_head: bool
    forward_tiles: Tiles
    backward_tiles: Tiles  # the row statistics do not depend on the tiling, so backward may tile differently
    slope: float = 0.0  # the neural MLP's activation: relu (0) or leaky_relu (LEAKY_SLOPE)


# GPU tiles per kernel and head-size block (BLOCK_D), (forward, backward): per pass, the tiles with the fewest
# lane-instructions per (query, key) pair in the cost model (scripts/check_triton_compile.py --cost; sm_90, bf16,
# causal, dropout 0.1) among those compiled without spilling to local memory; TILE_OVERRIDES then moves what spilled
# in the compile matrix (bf16 and fp16, d_h 64 and 128, causal and padding with dropout, sm_80 and sm_90;
# results/triton_compile/results.md). Head sizes above 128 take the 128 entry (not in the compile matrix). Speed on a
# GPU is unmeasured. The interpreter gets the smallest tiles tl.dot takes (16): it is slow per element.
INTERPRETER_TILES = (Tiles(16, 16, 4), Tiles(16, 16, 4))
NEURAL_ADD = "neural-add"  # neural with combine="add": it holds q, k and dQ's operands too
DOT_REFERENCE = "dot"  # triton_dot_reference.py, the cost model's reference (not on the library's paths)
_EXPRESSIVE_TILES = {64: (Tiles(128, 32, 8), Tiles(32, 64, 8)), 128: (Tiles(64, 32, 4), Tiles(32, 64, 8))}
GPU_TILES = {
    kernels.SCORE_RATIONAL: _EXPRESSIVE_TILES, kernels.SCORE_SQUARE: _EXPRESSIVE_TILES,
    kernels.SCORE_SOFTMAX_SQUARE: _EXPRESSIVE_TILES,
    kernels.SCORE_NEURAL: {64: (Tiles(128, 32, 8), Tiles(32, 32, 4)), 128: (Tiles(64, 32, 4), Tiles(16, 64, 8))},
    # at d_h 128 the MLP is 4 + 2 units wide besides dK, dV, k, v and q.k: only 16 x 32 / 8 held it without spilling
    NEURAL_ADD: {64: (Tiles(64, 32, 8), Tiles(32, 64, 8)), 128: (Tiles(64, 32, 8), Tiles(16, 32, 8))},
    DOT_REFERENCE: {64: (Tiles(128, 32, 8), Tiles(32, 64, 4)), 128: (Tiles(64, 16, 4), Tiles(32, 64, 8))},
}
# (kernel, GPU generation (compute capability x 10) or None, dtype or None) -> entries replacing GPU_TILES[kernel]'s,
# the more specific scope last. float16 runs its products on float32 operands (TF32, for range), so it holds twice
# the registers of bfloat16 in k, v, q and dO: smaller tiles.
_EXPRESSIVE_FP16 = {64: (Tiles(64, 16, 4), Tiles(32, 64, 8)), 128: (Tiles(64, 16, 4), Tiles(16, 64, 8))}
TILE_OVERRIDES = {
    # neural's backward at d_h 64: 32x64/8 on sm_90, where sm_80 capped it at 128 registers and spilled
    (kernels.SCORE_NEURAL, 90, None): {64: (Tiles(128, 32, 8), Tiles(32, 64, 8))},
    (kernels.SCORE_NEURAL, 80, torch.float16): {128: (Tiles(64, 32, 8), Tiles(16, 64, 8))},
    (kernels.SCORE_RATIONAL, None, torch.float16): _EXPRESSIVE_FP16,
    (kernels.SCORE_SQUARE, None, torch.float16): _EXPRESSIVE_FP16,
    (kernels.SCORE_SOFTMAX_SQUARE, None, torch.float16): _EXPRESSIVE_FP16,
    (kernels.SCORE_SOFTMAX_SQUARE, 80, None): {128: (Tiles(64, 32, 4), Tiles(16, 32, 4))},
    (kernels.SCORE_SOFTMAX_SQUARE, 80, torch.float16): {128: (Tiles(64, 16, 4), Tiles(16, 32, 4))},
    (NEURAL_ADD, None, torch.float16): {64: (Tiles(64, 32, 8), Tiles(16, 64, 8)),
                                        128: (Tiles(64, 16, 4), Tiles(16, 32, 8))},
    (NEURAL_ADD, 80, None): {64: (Tiles(64, 16, 4), Tiles(32, 64, 8))},
    (NEURAL_ADD, 80, torch.float16): {128: (Tiles(32, 32, 4), Tiles(16, 32, 8))},
    (DOT_REFERENCE, None, torch.float16): {64: (Tiles(64, 16, 4), Tiles(16, 64, 4)),
                                           128: (Tiles(64, 16, 4), Tiles(16, 64, 8))},
}


def block_d(head_dim: int) -> int:
    """The kernels' head-dimension block: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def tiles_for(table: dict[int, tuple[Tiles, Tiles]], head_dim: int) -> tuple[Tiles, Tiles]:
    """The (forward, backward) tiles of a per-BLOCK_D table: the smallest entry that holds the head size."""
    size = block_d(head_dim)
    return table[min((key for key in table if key >= size), default=max(table))]


def gpu_tiles(kernel, head_dim: int, arch: int, dtype: torch.dtype | None) -> tuple[Tiles, Tiles]:
    """The (forward, backward) GPU tiles of a kernel (a score, NEURAL_ADD or DOT_REFERENCE) for a head size, GPU
    generation and input dtype: GPU_TILES with TILE_OVERRIDES applied."""
    table = dict(GPU_TILES[kernel])
    for scope in ((kernel, arch, None), (kernel, None, dtype), (kernel, arch, dtype)):
        table.update(TILE_OVERRIDES.get(scope, {}))
    return tiles_for(table, head_dim)


def _arch(device: torch.device) -> int:
    """The GPU's compute capability x 10 (90 for an H100), 0 off CUDA."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _tiles(kernel, head_dim: int, device: torch.device, dtype: torch.dtype | None = None) -> tuple[Tiles, Tiles]:
    if kernels.interpreted():
        return INTERPRETER_TILES
    return gpu_tiles(kernel, head_dim, _arch(device), dtype)


def _keep_bytes(mask: KeyMask) -> torch.Tensor | None:
    """The keep mask as int8 for the kernels: a view of a bool mask (same bytes), no copy."""
    if mask.keep is None:
        return None
    return mask.keep.view(torch.int8) if mask.keep.dtype == torch.bool else mask.keep.to(torch.int8)


def triton_attention_output(inputs: KernelInputs, value: torch.Tensor, mask: KeyMask, dropout: float = 0.0,
                            seed: torch.Tensor | None = None) -> torch.Tensor | str:
    """[B, H, Lq, D] output of the fused kernels, or the reason they cannot take this call."""
    if not kernels.available():
        return "triton is installed but cannot be imported"
    if dropout >= 1.0:
        return "dropout p >= 1 drops every weight"
    causal = mask.pure_causal  # computed in the kernels from indices; tiles above the diagonal skipped
    keep = None if causal else _keep_bytes(mask)
    batch, heads = value.shape[0], inputs.query.shape[1]
    streams = dropout_streams(seed, batch, heads) if dropout > 0.0 else None
    empty = value.new_zeros(1, dtype=torch.float32)
    dim = inputs.query.shape[-1]
    if isinstance(inputs, ExpressiveKernelInputs):
        score = kernels.EXPRESSIVE_SCORES[inputs.form]
        call = KernelCall(score, False, inputs.dot_scale, keep, mask.bias, causal, dropout, streams, False,
                          *_tiles(score, dim, value.device, value.dtype))
        return _FusedAttention.apply(call, inputs.query, inputs.key, value, empty, empty, empty, empty, empty, empty)
    if inputs.activation not in ("relu", "leaky_relu"):
        return (f"the kernels cover neural's relu and leaky_relu MLPs; activation={inputs.activation!r} runs the "
                "chunked engine")
    per_head = inputs.hidden_weight.shape[0] > 1
    slope = LEAKY_SLOPE if inputs.activation == "leaky_relu" else 0.0
    tiles = _tiles(NEURAL_ADD if inputs.add_dot else kernels.SCORE_NEURAL, dim, value.device, value.dtype)
    call = KernelCall(kernels.SCORE_NEURAL, inputs.add_dot, inputs.dot_scale, keep, mask.bias, causal, dropout,
                      streams, per_head, *tiles, slope=slope)
    return _FusedAttention.apply(call, inputs.query, inputs.key, value, inputs.query_part, inputs.key_part,
                                 inputs.hidden_weight, inputs.hidden_bias, inputs.out_weight.flatten(1),
                                 inputs.out_bias.flatten())


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """[B, H, L, X] -> contiguous [B * H, L, X]."""
    return tensor.reshape(-1, *tensor.shape[2:]).contiguous()


def _float32_products(dtype: torch.dtype) -> str:
    """tl.dot's input precision for float32 operands. float32 models follow torch.get_float32_matmul_precision():
    IEEE products for PyTorch's default "highest" (CUDA cores, as cuBLAS then computes), TF32 tensor cores otherwise.
    float16 inputs are upcast to float32 for range (DOT_FP32); TF32 (10-bit mantissa, 8-bit exponent) holds every
    float16 value exactly, so those products keep float16's precision and float32's range on tensor cores."""
    if dtype == torch.float16 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _launch_settings(call: KernelCall, query, key, query_part, w2, b2):
    batch, heads, q_len, dim = query.shape
    keep = call.keep if call.keep is not None else query.new_zeros(1, 1, 1, 1, dtype=torch.int8)
    keep = keep.expand(batch, heads, q_len, key.shape[2])
    bias = call.bias if call.bias is not None else query.new_zeros(1, 1, 1, 1, dtype=torch.float32)
    bias = bias.expand(batch, heads, q_len, key.shape[2])
    units = query_part.shape[-1] if call.score == kernels.SCORE_NEURAL else 1
    outs = b2.shape[-1] if call.score == kernels.SCORE_NEURAL else 1
    return dict(
        stride_kb=keep.stride(0), stride_kh=keep.stride(1), stride_kq=keep.stride(2), stride_kk=keep.stride(3),
        stride_bb=bias.stride(0), stride_bh=bias.stride(1), stride_bq=bias.stride(2), stride_bk=bias.stride(3),
        HAS_BIAS=call.bias is not None, SLOPE=call.slope,
        H=heads, H_KV=key.shape[1], LQ=q_len, LK=key.shape[2], D=dim, dot_scale=call.dot_scale, dropout_p=call.dropout,
        threshold=kernels.signed_threshold(call.dropout),
        per_head=int(call.per_head), SCORE=call.score, ADD_DOT=call.add_dot, H1=units, H2=outs,
        BLOCK_H=max(2, kernels.triton.next_power_of_2(units)), HAS_KEEP=call.keep is not None, CAUSAL=call.causal,
        DROPOUT=call.dropout > 0.0, DOT_FP32=kernels.interpreted() or query.dtype == torch.float16,
        PRECISION=_float32_products(query.dtype),
        BLOCK_D=block_d(dim),
    ), keep, bias, (call.streams if call.streams is not None else query.new_zeros(1, dtype=torch.int32))


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: KernelCall, query, key, value, query_part, key_part, w2, b2, w3, b3):
        batch, heads, q_len, dim = query.shape
        settings, keep, bias, streams = _launch_settings(call, query, key, query_part, w2, b2)
        flat = [_flat(t) for t in (query, key, value)]
        parts = [_flat(t.float()) if call.score == kernels.SCORE_NEURAL else t for t in (query_part, key_part)]
        weights = [t.float().contiguous() for t in (w2, b2, w3, b3)]
        # float32 O: backward's row term sum(dO * O) from a rounded half-precision O is off by its rounding, which the
        # softmax derivative's cancellation amplifies (neural's last bias, whose gradient is 0, got 0.03 in bf16).
        out = torch.empty_like(flat[0], dtype=torch.float32)
        row_max = torch.empty(batch * heads, q_len, device=query.device, dtype=torch.float32)
        row_sum = torch.empty_like(row_max)
        tiles = call.forward_tiles
        grid = (kernels.triton.cdiv(q_len, tiles.block_m), batch * heads)
        kernels._forward_kernel[grid](*flat, *parts, *weights, keep, bias, streams, out, row_max, row_sum,
                                      BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps, **settings)
        ctx.call, ctx.settings, ctx.shape, ctx.streams = call, settings, query.shape, streams
        ctx.save_for_backward(query, key, value, query_part, key_part, w2, b2, w3, b3, out, row_max, row_sum, keep,
                              bias)
        return out.view(batch, heads, q_len, dim).to(value.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, query_part, key_part, w2, b2, w3, b3, out, row_max, row_sum, keep, bias = ctx.saved_tensors
        call, settings = ctx.call, ctx.settings
        batch, heads, q_len, dim = ctx.shape
        k_len = key.shape[2]
        neural = call.score == kernels.SCORE_NEURAL
        flat = [_flat(t) for t in (query, key, value)]
        grad_out = _flat(grad_output).to(value.dtype)
        row_dot = (grad_out.float() * out.float()).sum(-1)  # [B * H, Lq]: sum_j dL/da_ij a_ij, FlashAttention's D
        parts = [_flat(t.float()) if neural else t for t in (query_part, key_part)]
        weights = [t.float().contiguous() for t in (w2, b2, w3, b3)]
        grads = [torch.zeros(t.shape, device=t.device, dtype=torch.float32) for t in flat]  # dq, dk, dv
        grad_parts = [torch.zeros_like(t, dtype=torch.float32) for t in parts]
        tiles = call.backward_tiles
        key_blocks = kernels.triton.cdiv(k_len, tiles.block_n)
        size = settings["H2"] * settings["H1"] + 2 * settings["H2"] + 1
        partial = torch.zeros(batch * heads * key_blocks, size if neural else 1, device=query.device)
        block_h2 = max(2, kernels.triton.next_power_of_2(settings["H2"]))
        common = [*flat, grad_out, row_dot, row_max, row_sum, *parts, *weights, keep, bias, ctx.streams, *grads,
                  *grad_parts, partial]
        kernels._backward_kernel[(key_blocks, batch * heads)](
            *common, BLOCK_H2=block_h2, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
            **settings)
        grad_q, grad_k, grad_v = (g.view(t.shape).to(t.dtype) for g, t in zip(grads, (query, key, value)))
        if not neural:
            return None, grad_q, grad_k, grad_v, None, None, None, None, None, None
        grad_qp, grad_kp = (g.view(batch, heads, -1, g.shape[-1]).to(t.dtype)
                            for g, t in zip(grad_parts, (query_part, key_part)))
        per_head = partial.view(batch, heads, key_blocks, size).sum(dim=(0, 2))  # [H, size]
        if not call.per_head:
            per_head = per_head.sum(dim=0, keepdim=True)
        h1, h2 = settings["H1"], settings["H2"]
        grad_w2 = per_head[:, : h2 * h1].view_as(w2).to(w2.dtype)
        grad_b2 = per_head[:, h2 * h1 : h2 * h1 + h2].view_as(b2).to(b2.dtype)
        grad_w3 = per_head[:, h2 * h1 + h2 : h2 * h1 + 2 * h2].view_as(w3).to(w3.dtype)
        grad_b3 = per_head[:, -1].view_as(b3).to(b3.dtype)
        if not call.add_dot:
            grad_q = grad_k = None  # q and k reach the scores only through query_part and key_part
        return None, grad_q, grad_k, grad_v, grad_qp, grad_kp, grad_w2, grad_b2, grad_w3, grad_b3
