"""A dot-product attention reference in the style of triton_kernels.py, on FlashAttention-2's algorithm, for the cost
model of scripts/check_triton_compile.py: every instruction count of the expressive and neural kernels gets a
same-compiler, same-run ratio to the kernel they are meant to be compared with. Not used by the library's paths.

    forward   per (query block, batch*head): online softmax in base 2 (log2(e) folded into the scale), one
              reciprocal per row at the end, the row's log-sum-exp (base 2) saved
    backward  per (key block, batch*head), looping over the query blocks that see it (FlashAttention-2's
              Algorithm 2): dK and dV in registers, dQ accumulated atomically in float32

Masks and dropout as the project's kernels take them: the causal pattern computed from indices (bottom-right
aligned, tiles above the diagonal skipped), any other keep pattern read as int8 per tile, and the project's
position-keyed dropout (triton_kernels._dropout_keep). Offsets per program are 64-bit.
`dot_reference_attention` runs it (tested under the interpreter against torch in tests/test_triton_kernels.py).
"""

from __future__ import annotations

import torch

from . import triton_kernels as kernels

triton, tl = kernels.triton, kernels.tl
LOG2E = 1.4426950408889634
# (forward, backward) tiles: triton_attention.gpu_tiles(DOT_REFERENCE, ...), chosen as the project's kernels' are
# (fewest lane-instructions per pair in the cost model without spills)

if triton is not None:

    @triton.jit
    def _forward_tile(
        acc, row_max, row_sum, q, start, rows, dims, row_keys, k_head, v_head, keep_ptr, stride_kq, stride_kk, LQ, LK,
        D: tl.constexpr, scale2, threshold, HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        """One key tile of the online softmax; MASKED: the tile may hold keys a row does not see."""
        cols = start + tl.arange(0, BLOCK_N)
        k = kernels._load_rows(k_head, cols, LK, dims, D, BLOCK_D, DOT_FP32, MASKED)
        v = kernels._load_rows(v_head, cols, LK, dims, D, BLOCK_D, DOT_FP32, MASKED)
        if MASKED:
            keep = kernels._load_keep(keep_ptr, stride_kq, stride_kk, rows, cols, LQ, LK, HAS_KEEP, CAUSAL)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
        if MASKED:
            s = tl.where(keep, s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        else:  # every key visible: the maximum is finite
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            safe_max = new_max
        weights = tl.exp2(s - safe_max[:, None])
        rescale = tl.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None]
        if DROPOUT:
            weights = tl.where(kernels._dropout_keep(row_keys, cols, threshold), weights, 0.0)
        acc += tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        return acc, new_max, row_sum

    @triton.jit
    def _backward_tile(
        start, grad_k, grad_v, q_head, do_head, stats_head, ROW_DOT, LSE, dq_head, k, v, cols, dims, keep_ptr,
        stride_kq, stride_kk, stream, threshold, kept_scale, scale2, dot_scale, LQ, LK, D: tl.constexpr,
        HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    ):
        """One query tile of a key block's backward; MASKED: the tile may hold pairs the forward masked (rows past
        LQ need no mask: their log-sum-exp is +inf, so their weights are 0)."""
        rows = start + tl.arange(0, BLOCK_M)
        q = kernels._load_rows(q_head, rows, LQ, dims, D, BLOCK_D, DOT_FP32)
        do = kernels._load_rows(do_head, rows, LQ, dims, D, BLOCK_D, DOT_FP32)
        row_dot = tl.load(ROW_DOT + stats_head + rows, mask=rows < LQ, other=0.0)
        lse = tl.load(LSE + stats_head + rows, mask=rows < LQ, other=float("inf"))
        if MASKED:
            keep = kernels._load_keep(keep_ptr, stride_kq, stride_kk, rows, cols, LQ, LK, HAS_KEEP, CAUSAL)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
        weights = tl.exp2(s - lse[:, None])
        if MASKED:
            weights = tl.where(keep, weights, 0.0)
        grad_weights = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            kept = kernels._dropout_keep(kernels._dropout_row_keys(stream, rows, DROPOUT), cols, threshold)
            weights_dropped = tl.where(kept, weights * kept_scale, 0.0)
            grad_weights = tl.where(kept, grad_weights * kept_scale, 0.0)
        else:
            weights_dropped = weights
        ds = weights * (grad_weights - row_dot[:, None]) * dot_scale
        grad_v += tl.dot(tl.trans(weights_dropped).to(do.dtype), do, input_precision=PRECISION)
        grad_k += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        grad_q = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.atomic_add(dq_head + rows[:, None] * D + dims[None, :], grad_q,
                      mask=kernels._inside(rows, LQ, dims, D, BLOCK_D), sem="relaxed")
        return grad_k, grad_v

    @triton.jit
    def _reference_forward(
        Q, K, V, KEEP, OUT, LSE, STREAMS,
        stride_kb, stride_kh, stride_kq, stride_kk, H, H_KV, LQ, LK, D: tl.constexpr, scale2, dropout_p, threshold,
        HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        block = tl.program_id(0)
        b, h, bh64, bkv64 = kernels._program_heads(H, H_KV)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q = kernels._load_rows(Q + bh64 * LQ * D, rows, LQ, dims, D, BLOCK_D, DOT_FP32)
        keep_ptr = KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        stream = kernels._dropout_stream(STREAMS, bh64, DROPOUT)
        row_keys = kernels._dropout_row_keys(stream, rows, DROPOUT)
        row_max = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_head, v_head = K + bkv64 * LK * D, V + bkv64 * LK * D
        masked_start = 0
        if not HAS_KEEP:  # the key tiles every row sees whole: no mask compare (FlashAttention's split)
            masked_start = kernels._full_key_end(block, LQ, LK, BLOCK_M, BLOCK_N, CAUSAL)
            for start in range(0, masked_start, BLOCK_N):
                acc, row_max, row_sum = _forward_tile(
                    acc, row_max, row_sum, q, start, rows, dims, row_keys, k_head, v_head, keep_ptr, stride_kq,
                    stride_kk, LQ, LK, D, scale2, threshold, HAS_KEEP, CAUSAL, DROPOUT, DOT_FP32, PRECISION, BLOCK_N,
                    BLOCK_D, False)
        for start in range(masked_start, kernels._key_end(block, LQ, LK, BLOCK_M, CAUSAL), BLOCK_N):
            acc, row_max, row_sum = _forward_tile(
                acc, row_max, row_sum, q, start, rows, dims, row_keys, k_head, v_head, keep_ptr, stride_kq, stride_kk,
                LQ, LK, D, scale2, threshold, HAS_KEEP, CAUSAL, DROPOUT, DOT_FP32, PRECISION, BLOCK_N, BLOCK_D, True)
        inverse = tl.where(row_sum > 0, 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)  # fully masked rows: 0
        if DROPOUT:
            inverse = inverse / (1.0 - dropout_p)
        out = acc * inverse[:, None]
        tl.store(OUT + bh64 * LQ * D + rows[:, None] * D + dims[None, :], out.to(OUT.dtype.element_ty),
                 mask=kernels._inside(rows, LQ, dims, D, BLOCK_D))
        lse = tl.where(row_sum > 0, row_max + tl.log2(tl.where(row_sum > 0, row_sum, 1.0)), float("inf"))
        tl.store(LSE + bh64 * LQ + rows, lse, mask=rows < LQ)

    @triton.jit
    def _reference_backward(
        Q, K, V, DO, ROW_DOT, LSE, KEEP, STREAMS, DQ, DK, DV,
        stride_kb, stride_kh, stride_kq, stride_kk, H, H_KV, LQ, LK, D: tl.constexpr, scale2, dot_scale, dropout_p,
        threshold,
        HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        block = tl.program_id(0)
        b, h, bh64, bkv64 = kernels._program_heads(H, H_KV)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        k = kernels._load_rows(K + bkv64 * LK * D, cols, LK, dims, D, BLOCK_D, DOT_FP32)
        v = kernels._load_rows(V + bkv64 * LK * D, cols, LK, dims, D, BLOCK_D, DOT_FP32)
        keep_ptr = KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        stream = kernels._dropout_stream(STREAMS, bh64, DROPOUT)
        grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        kept_scale = 1.0 / (1.0 - dropout_p)
        q_head, do_head, dq_head = Q + bh64 * LQ * D, DO + bh64 * LQ * D, DQ + bh64 * LQ * D
        masked_end = LQ
        if not HAS_KEEP:  # the query tiles that see the whole key block: no mask compare
            masked_end = kernels._full_query_start(block, LQ, LK, BLOCK_M, BLOCK_N, CAUSAL)
            for start in range(masked_end, LQ, BLOCK_M):
                grad_k, grad_v = _backward_tile(
                    start, grad_k, grad_v, q_head, do_head, bh64 * LQ, ROW_DOT, LSE, dq_head, k, v, cols, dims,
                    keep_ptr, stride_kq, stride_kk, stream, threshold, kept_scale, scale2, dot_scale, LQ, LK, D,
                    HAS_KEEP, CAUSAL, DROPOUT, DOT_FP32, PRECISION, BLOCK_M, BLOCK_D, False)
        for start in range(kernels._query_start(block, LQ, LK, BLOCK_M, BLOCK_N, CAUSAL), masked_end, BLOCK_M):
            grad_k, grad_v = _backward_tile(
                start, grad_k, grad_v, q_head, do_head, bh64 * LQ, ROW_DOT, LSE, dq_head, k, v, cols, dims, keep_ptr,
                stride_kq, stride_kk, stream, threshold, kept_scale, scale2, dot_scale, LQ, LK, D, HAS_KEEP, CAUSAL,
                DROPOUT, DOT_FP32, PRECISION, BLOCK_M, BLOCK_D, True)
        own = kernels._inside(cols, LK, dims, D, BLOCK_D)
        tl.atomic_add(DK + bkv64 * LK * D + cols[:, None] * D + dims[None, :], grad_k, mask=own, sem="relaxed")
        tl.atomic_add(DV + bkv64 * LK * D + cols[:, None] * D + dims[None, :], grad_v, mask=own, sem="relaxed")


class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, settings, tiles, query, key, value, keep, streams):
        from .triton_attention import _flat

        batch, heads, q_len, dim = query.shape
        flat = [_flat(t) for t in (query, key, value)]
        out = torch.empty_like(flat[0])
        lse = torch.empty(batch * heads, q_len, device=query.device, dtype=torch.float32)
        forward, _ = tiles
        grid = (triton.cdiv(q_len, forward.block_m), batch * heads)
        _reference_forward[grid](*flat, keep, out, lse, streams, BLOCK_M=forward.block_m, BLOCK_N=forward.block_n,
                                 num_warps=forward.num_warps, **settings)
        ctx.settings, ctx.tiles = settings, tiles
        ctx.save_for_backward(query, key, value, keep, streams, out, lse)
        return out.view(query.shape)

    @staticmethod
    def backward(ctx, grad_output):
        from .triton_attention import _flat

        query, key, value, keep, streams, out, lse = ctx.saved_tensors
        batch, heads, q_len, dim = query.shape
        flat = [_flat(t) for t in (query, key, value)]
        grad_out = _flat(grad_output).to(value.dtype)
        row_dot = (grad_out.float() * out.float()).sum(-1)
        grads = [torch.zeros(t.shape, device=t.device, dtype=torch.float32) for t in flat]
        _, backward = ctx.tiles
        settings = dict(ctx.settings, dot_scale=ctx.settings["scale2"] / LOG2E)
        grid = (triton.cdiv(key.shape[2], backward.block_n), batch * heads)
        _reference_backward[grid](*flat, grad_out, row_dot, lse, keep, streams, *grads, BLOCK_M=backward.block_m,
                                  BLOCK_N=backward.block_n, num_warps=backward.num_warps, **settings)
        grad_q, grad_k, grad_v = (g.view(t.shape).to(t.dtype) for g, t in zip(grads, (query, key, value)))
        return None, None, grad_q, grad_k, grad_v, None, None


def dot_reference_attention(query, key, value, keep, causal: bool, scaling: float, dropout: float,
                            seed: torch.Tensor | None = None, tiles=None):
    """softmax(q k^T scaling, masked) (dropped) v through the reference kernels. keep: bool broadcastable to
    [B, H, Lq, Lk] or None; causal: the bottom-right causal pattern computed in the kernels (keep then unused)."""
    from . import triton_attention
    from .dropout_mask import dropout_streams, keep_threshold

    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    keep_bytes = (keep.view(torch.int8) if keep is not None and not causal
                  else query.new_zeros(1, 1, 1, 1, dtype=torch.int8))
    keep_bytes = keep_bytes.expand(batch, heads, q_len, k_len)
    streams = (dropout_streams(seed, batch, heads) if dropout > 0.0
               else torch.zeros(batch, heads, dtype=torch.int32, device=query.device))
    settings = dict(
        stride_kb=keep_bytes.stride(0), stride_kh=keep_bytes.stride(1), stride_kq=keep_bytes.stride(2),
        stride_kk=keep_bytes.stride(3), H=heads, H_KV=heads, LQ=q_len, LK=k_len, D=dim, scale2=scaling * LOG2E,
        dropout_p=dropout, threshold=kernels.signed_threshold(dropout), HAS_KEEP=keep is not None and not causal,
        CAUSAL=causal, DROPOUT=dropout > 0.0,
        DOT_FP32=kernels.interpreted() or query.dtype == torch.float16,
        PRECISION=triton_attention._float32_products(query.dtype), BLOCK_D=triton_attention.block_d(dim))
    tiles = tiles or triton_attention._tiles(triton_attention.DOT_REFERENCE, dim, query.device, query.dtype)
    return _ReferenceAttention.apply(settings, tiles, query, key, value, keep_bytes, streams)
