"""The Triton path: the fused kernels (triton_kernels.py) run on a variant's named kernel inputs (kernel_inputs.py),
as torch.library custom ops (forward and backward, each with a fake implementation, autograd registered), so
torch.compile keeps them in a model's graph.

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
from typing import NamedTuple, Optional

import torch

from . import triton_kernels as kernels
from .chunked import op_namespace
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
    dim = inputs.query.shape[-1]
    if isinstance(inputs, ExpressiveKernelInputs):
        score = kernels.EXPRESSIVE_SCORES[inputs.form]
        call = KernelCall(score, False, inputs.dot_scale, keep, mask.bias, causal, dropout, streams, False,
                          *_tiles(score, dim, value.device, value.dtype))
        return fused_attention(call, inputs.query, inputs.key, value)
    if inputs.activation not in ("relu", "leaky_relu"):
        return (f"the kernels cover neural's relu and leaky_relu MLPs; activation={inputs.activation!r} runs the "
                "chunked engine")
    per_head = inputs.hidden_weight.shape[0] > 1
    slope = LEAKY_SLOPE if inputs.activation == "leaky_relu" else 0.0
    tiles = _tiles(NEURAL_ADD if inputs.add_dot else kernels.SCORE_NEURAL, dim, value.device, value.dtype)
    call = KernelCall(kernels.SCORE_NEURAL, inputs.add_dot, inputs.dot_scale, keep, mask.bias, causal, dropout,
                      streams, per_head, *tiles, slope=slope)
    return fused_attention(call, inputs.query, inputs.key, value, inputs.query_part, inputs.key_part,
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


# ---- the kernels as custom ops: torch.compile keeps each layer's fused attention in the model's graph as one opaque
# node (with fake implementations for the shapes), where tracing into the kernel launch broke the graph -------------

_NAMESPACE = op_namespace(__name__)


def _op_arguments(call: KernelCall) -> tuple:
    """A KernelCall as a custom op's arguments after the MLP tensors: tensors, then plain scalars (an op cannot
    take the dataclass); `_call_of` reads them back."""
    return (call.keep, call.bias, call.streams, call.score, call.add_dot, float(call.dot_scale), call.causal,
            float(call.dropout), call.per_head, float(call.slope), [*call.forward_tiles, *call.backward_tiles])


def _call_of(keep, bias, streams, score, add_dot, dot_scale, causal, dropout, per_head, slope, tiles) -> KernelCall:
    return KernelCall(score, add_dot, dot_scale, keep, bias, causal, dropout, streams, per_head, Tiles(*tiles[:3]),
                      Tiles(*tiles[3:]), slope=slope)


def _mlp_tensors(mlp: list[torch.Tensor], value: torch.Tensor) -> list[torch.Tensor]:
    """neural's [query_part, key_part, w2, b2, w3, b3]; for expressive, which has none, one-element float32
    placeholders (the kernels take a pointer for each)."""
    return list(mlp) if mlp else [value.new_zeros(1, dtype=torch.float32)] * 6


def _drops_query_and_key(score: int, add_dot: bool) -> bool:
    """neural without combine="add": q and k reach the scores only through query_part and key_part."""
    return score == kernels.SCORE_NEURAL and not add_dot


@torch.library.custom_op(f"{_NAMESPACE}::fused_forward", mutates_args=())
def _fused_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mlp: list[torch.Tensor],
                   keep: Optional[torch.Tensor], bias: Optional[torch.Tensor], streams: Optional[torch.Tensor],
                   score: int, add_dot: bool, dot_scale: float, causal: bool, dropout: float, per_head: bool,
                   slope: float, tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output [B, H, Lq, D] in float32, row max and row sum [B * H, Lq]) of the forward kernel. mlp: neural's
    [query_part, key_part, w2, b2, w3, b3], empty for expressive; then the KernelCall (`_op_arguments`)."""
    call = _call_of(keep, bias, streams, score, add_dot, dot_scale, causal, dropout, per_head, slope, tiles)
    query_part, key_part, w2, b2, w3, b3 = _mlp_tensors(mlp, value)
    batch, heads, q_len, dim = query.shape
    settings, keep, bias, streams = _launch_settings(call, query, key, query_part, w2, b2)
    flat = [_flat(t) for t in (query, key, value)]
    parts = [_flat(t.float()) if score == kernels.SCORE_NEURAL else t for t in (query_part, key_part)]
    weights = [t.float().contiguous() for t in (w2, b2, w3, b3)]
    # float32 O: backward's row term sum(dO * O) from a rounded half-precision O is off by its rounding, which the
    # softmax derivative's cancellation amplifies (neural's last bias, whose gradient is 0, got 0.03 in bf16).
    out = torch.empty_like(flat[0], dtype=torch.float32)
    row_max = torch.empty(batch * heads, q_len, device=query.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    tiles_ = call.forward_tiles
    grid = (kernels.triton.cdiv(q_len, tiles_.block_m), batch * heads)
    kernels._forward_kernel[grid](*flat, *parts, *weights, keep, bias, streams, out, row_max, row_sum,
                                  BLOCK_M=tiles_.block_m, BLOCK_N=tiles_.block_n, num_warps=tiles_.num_warps,
                                  **settings)
    return out.view(batch, heads, q_len, dim), row_max, row_sum


@_fused_forward.register_fake
def _(query, key, value, mlp, *call):
    batch, heads, q_len, dim = query.shape
    row_max, row_sum = (query.new_empty(batch * heads, q_len, dtype=torch.float32) for _ in range(2))
    return query.new_empty(batch, heads, q_len, dim, dtype=torch.float32), row_max, row_sum


@torch.library.custom_op(f"{_NAMESPACE}::fused_backward", mutates_args=())
def _fused_backward(grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    mlp: list[torch.Tensor], out: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor,
                    keep: Optional[torch.Tensor], bias: Optional[torch.Tensor], streams: Optional[torch.Tensor],
                    score: int, add_dot: bool, dot_scale: float, causal: bool, dropout: float, per_head: bool,
                    slope: float, tiles: list[int]) -> list[torch.Tensor]:
    """[dq, dk, dv, *d(mlp)] of the backward kernel, each shaped and typed as its input (dq and dk empty where the
    scores do not read q and k)."""
    call = _call_of(keep, bias, streams, score, add_dot, dot_scale, causal, dropout, per_head, slope, tiles)
    query_part, key_part, w2, b2, w3, b3 = _mlp_tensors(mlp, value)
    settings, keep, bias, streams = _launch_settings(call, query, key, query_part, w2, b2)
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    neural = score == kernels.SCORE_NEURAL
    flat = [_flat(t) for t in (query, key, value)]
    out = _flat(out)
    grad_out = _flat(grad_output).to(value.dtype)
    row_dot = (grad_out.float() * out).sum(-1)  # [B * H, Lq]: sum_j dL/da_ij a_ij, FlashAttention's D
    parts = [_flat(t.float()) if neural else t for t in (query_part, key_part)]
    weights = [t.float().contiguous() for t in (w2, b2, w3, b3)]
    grads = [torch.zeros(t.shape, device=t.device, dtype=torch.float32) for t in flat]  # dq, dk, dv
    grad_parts = [torch.zeros_like(t, dtype=torch.float32) for t in parts]
    tiles_ = call.backward_tiles
    key_blocks = kernels.triton.cdiv(k_len, tiles_.block_n)
    size = settings["H2"] * settings["H1"] + 2 * settings["H2"] + 1
    partial = torch.zeros(batch * heads * key_blocks, size if neural else 1, device=query.device)
    block_h2 = max(2, kernels.triton.next_power_of_2(settings["H2"]))
    common = [*flat, grad_out, row_dot, row_max, row_sum, *parts, *weights, keep, bias, streams, *grads,
              *grad_parts, partial]
    kernels._backward_kernel[(key_blocks, batch * heads)](
        *common, BLOCK_H2=block_h2, BLOCK_M=tiles_.block_m, BLOCK_N=tiles_.block_n, num_warps=tiles_.num_warps,
        **settings)
    grad_q, grad_k, grad_v = (g.view(t.shape).to(t.dtype) for g, t in zip(grads, (query, key, value)))
    if _drops_query_and_key(score, add_dot):
        grad_q, grad_k = query.new_empty(0), key.new_empty(0)
    if not neural:
        return [grad_q, grad_k, grad_v]
    grad_qp, grad_kp = (g.view(t.shape).to(t.dtype) for g, t in zip(grad_parts, (query_part, key_part)))
    per_head_sums = partial.view(batch, heads, key_blocks, size).sum(dim=(0, 2))  # [H, size]
    if not per_head:
        per_head_sums = per_head_sums.sum(dim=0, keepdim=True)
    h1, h2 = settings["H1"], settings["H2"]
    sections = (per_head_sums[:, : h2 * h1], per_head_sums[:, h2 * h1 : h2 * h1 + h2],
                per_head_sums[:, h2 * h1 + h2 : h2 * h1 + 2 * h2], per_head_sums[:, -1])
    # each a fresh tensor of its own (an op's outputs may not share storage), contiguous as the fake says
    grad_weights = [t.new_empty(t.shape).copy_(section.reshape(t.shape))
                    for section, t in zip(sections, (w2, b2, w3, b3))]
    return [grad_q, grad_k, grad_v, grad_qp, grad_kp, *grad_weights]


@_fused_backward.register_fake
def _(grad_output, query, key, value, mlp, out, row_max, row_sum, keep, bias, streams, score, add_dot, *call):
    drops = _drops_query_and_key(score, add_dot)
    grad_q, grad_k = (t.new_empty(0) if drops else t.new_empty(t.shape) for t in (query, key))
    return [grad_q, grad_k, value.new_empty(value.shape), *(t.new_empty(t.shape) for t in mlp)]


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, mlp, keep, bias, streams, *scalars = inputs
    ctx.scalars = scalars
    ctx.mark_non_differentiable(*output[1:])  # the row statistics
    ctx.save_for_backward(query, key, value, keep, bias, streams, *output, *mlp)


def _backward(ctx, grad_output, _grad_row_max, _grad_row_sum):
    query, key, value, keep, bias, streams, out, row_max, row_sum, *mlp = ctx.saved_tensors
    grads = _fused_backward(grad_output, query, key, value, mlp, out, row_max, row_sum, keep, bias, streams,
                            *ctx.scalars)
    needs = [*ctx.needs_input_grad[:3], *ctx.needs_input_grad[3]]
    drops = _drops_query_and_key(*ctx.scalars[:2])
    grads = [grad if need and not (drops and index < 2) else None
             for index, (grad, need) in enumerate(zip(grads, needs))]
    return (*grads[:3], grads[3:], None, None, None, *(None for _ in ctx.scalars))


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(call: KernelCall, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    *mlp: torch.Tensor) -> torch.Tensor:
    """[B, H, Lq, D] output of the fused kernels in value's dtype, differentiable in q, k, v and neural's MLP
    tensors (mlp: query_part, key_part, w2, b2, w3, b3; none for expressive). The cast to value's dtype stays
    outside the op: for float32 it returns the op's own output, which an op may not hand out twice."""
    output, _, _ = _fused_forward(query, key, value, list(mlp), *_op_arguments(call))
    return output.to(value.dtype)
