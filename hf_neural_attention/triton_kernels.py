"""Fused Triton kernels, forward and backward, for expressive and neural attention: tiled over query and key blocks
as FlashAttention-2 is, never writing an Lq x Lk map to memory.

Per (batch*head, query block) the forward walks the key blocks and keeps, per query row, the running sum of the
weights (and, for exp-based scores, the running max), in float32 whatever the input dtype:

    expressive rational / square   f = s^2/(1+s^2) or s^2 with s = q.k (x scaling): a running sum, no max needed
    expressive softmax_square      f = exp(s^2 - m): online softmax of s^2; masked keys weigh 0 (ratio rule)
    neural                          logit = W3 relu(W2 relu(qp_i + kp_j) + b2) + b3 (+ q.k scaling for combine="add"),
                                    online softmax; masked keys at -1e30, so a fully masked row is uniform as in eager

qp and kp are the first MLP layer's per-query and per-key parts (neural.py's split, computed by `prepare` under
autograd, so the gradients of the down-projections flow from the kernel's dqp, dkp). The backward recomputes each
tile's scores from the saved row statistics in one kernel per key block (dK, dV, dkp and per-program partial sums
of the MLP weights' gradients, reduced afterwards), adding dQ and dqp atomically in float32, as FlashAttention-2
does, so the MLP and the exponentials run twice per tile in training (forward, backward), not three times. Attention dropout is
dropout_mask's position-keyed hash (a uint32 stream key per (batch, head), mixed with the query row once per row and
with the key column per element, about 10 integer operations), the same mask in forward and backward and on every
path.

Masks: any boolean keep pattern broadcastable to [B, H, Lq, Lk] (causal, padding, sliding window), read tile by tile;
a keep pattern that is exactly the bottom-right causal one is not read at all (CAUSAL: computed from the indices, and
the tiles above the diagonal are skipped, as FlashAttention does). An additive float bias (HAS_BIAS, broadcastable
the same way) is read tile by tile as the keep mask is.
The neural MLP's activation is relu or leaky_relu (SLOPE). Grouped-query keys and values arrive once per key/value
head (H_KV divides H; query head h reads kv head h // (H / H_KV)), and their gradients are added per group.

Part of the flat folder saved checkpoints copy for `trust_remote_code`: imports only torch, triton (optional) and its
siblings. Triton's interpreter (TRITON_INTERPRET=1) runs these kernels on the CPU; it computes bfloat16 tl.dot
wrongly, so there the products run in float32 (`interpreted()`), on a GPU in the input dtype. Float32 products
(PRECISION) follow torch.get_float32_matmul_precision() for float32 models and use TF32 for upcast float16 inputs
(triton_attention._float32_products).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; the chunked path runs
    triton = None

NEG = -1.0e30  # masked neural logit: finite, so a fully masked row gets uniform weights (eager's finfo.min softmax)
SCORE_RATIONAL, SCORE_SQUARE, SCORE_SOFTMAX_SQUARE, SCORE_NEURAL = 0, 1, 2, 3
EXPRESSIVE_SCORES = {"rational": SCORE_RATIONAL, "square": SCORE_SQUARE, "softmax_square": SCORE_SOFTMAX_SQUARE}


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def signed_threshold(p: float) -> int:
    """dropout_mask.keep_threshold(p) - 2^31: the kernels compare the hash with its sign bit flipped, as int32."""
    from .dropout_mask import keep_threshold

    return keep_threshold(p) - 2**31 if p > 0.0 else -(2**31)


if triton is not None:
    # the same constants as the module's, in the form jit functions may read globals
    NEG_ = tl.constexpr(NEG)
    RATIONAL_ = tl.constexpr(SCORE_RATIONAL)
    SQUARE_ = tl.constexpr(SCORE_SQUARE)
    SOFTMAX_SQUARE_ = tl.constexpr(SCORE_SOFTMAX_SQUARE)
    NEURAL_ = tl.constexpr(SCORE_NEURAL)

    @triton.jit
    def _activate(x, SLOPE: tl.constexpr):
        """The MLP's hidden activation: relu (SLOPE 0) or leaky_relu with that slope."""
        if SLOPE == 0.0:
            return tl.maximum(x, 0.0)
        return tl.where(x > 0, x, x * SLOPE)

    @triton.jit
    def _activate_backward(x, grad, SLOPE: tl.constexpr):
        """dL/dx from dL/d(activation(x))."""
        return tl.where(x > 0, grad, grad * SLOPE)

    @triton.jit
    def _tile(q, k, qp_ptr, kp_ptr, w2_ptr, b2_ptr, w3_ptr, b3, rows, cols, LQ, LK, keep, bias, dot_scale,
              SCORE: tl.constexpr, ADD_DOT: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr,
              BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, SLOPE: tl.constexpr):
        """Scores of one [BLOCK_M, BLOCK_N] tile: (values, s) where values are f (masked: 0) for the expressive
        scores and logits (masked: NEG) for neural; s is q.k x dot_scale (0 where not used). An additive mask bias
        (HAS_BIAS) adds to the logits and to softmax_square's s^2, and multiplies rational's and square's f by
        exp(bias), as the chunked path's softmax and ratio rules do."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * dot_scale
        if SCORE == NEURAL_:
            units = tl.arange(0, BLOCK_H)
            qp = tl.load(qp_ptr + rows[:, None] * H1 + units[None, :], mask=(rows[:, None] < LQ) & (units[None, :] < H1), other=0.0)
            kp = tl.load(kp_ptr + cols[:, None] * H1 + units[None, :], mask=(cols[:, None] < LK) & (units[None, :] < H1), other=0.0)
            hidden = _activate(qp[:, None, :] + kp[None, :, :], SLOPE)  # [M, N, BLOCK_H]
            logits = tl.zeros_like(s) + b3
            for o in tl.static_range(H2):
                w2 = tl.load(w2_ptr + o * H1 + units, mask=units < H1, other=0.0)
                z = tl.sum(hidden * w2[None, None, :], axis=2) + tl.load(b2_ptr + o)
                logits += tl.load(w3_ptr + o) * _activate(z, SLOPE)
            if ADD_DOT:
                logits += s
            if HAS_BIAS:
                logits += bias
            return tl.where(keep, logits, NEG_), s
        squared = s * s
        if SCORE == RATIONAL_:
            values = squared / (1.0 + squared)
        else:
            values = squared  # square; softmax_square exponentiates with the running max
        if HAS_BIAS:
            values = values + bias if SCORE == SOFTMAX_SQUARE_ else values * tl.exp(bias)
        return tl.where(keep, values, 0.0), s

    @triton.jit
    def _load_bias(bias_ptr, stride_bq, stride_bk, rows, cols, LQ, LK, HAS_BIAS: tl.constexpr):
        """The additive mask bias of a tile in float32 (0 outside), or 0 without one."""
        if HAS_BIAS:
            inside = (rows[:, None] < LQ) & (cols[None, :] < LK)
            return tl.load(bias_ptr + rows[:, None].to(tl.int64) * stride_bq + cols[None, :] * stride_bk, mask=inside,
                           other=0.0).to(tl.float32)
        return 0.0

    @triton.jit
    def _load_keep(keep_ptr, stride_kq, stride_kk, rows, cols, LQ, LK, HAS_KEEP: tl.constexpr,
                   CAUSAL: tl.constexpr):
        inside = (rows[:, None] < LQ) & (cols[None, :] < LK)
        if CAUSAL:  # bottom-right aligned: query i is key slot LK - LQ + i
            inside = inside & (cols[None, :] <= rows[:, None] + (LK - LQ))
        if HAS_KEEP:
            kept = tl.load(keep_ptr + rows[:, None].to(tl.int64) * stride_kq + cols[None, :] * stride_kk, mask=inside,
                           other=0)
            return inside & (kept != 0)
        return inside

    @triton.jit
    def _key_end(block, LQ, LK, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
        """One past the last key a query block may see: causal blocks stop at their diagonal."""
        if CAUSAL:
            return tl.minimum(LK, (block + 1) * BLOCK_M + (LK - LQ))
        return LK

    @triton.jit
    def _query_start(block, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """The first query block that sees any key of a key block: causal rows above it see none."""
        if CAUSAL:
            return tl.maximum(block * BLOCK_N - (LK - LQ), 0) // BLOCK_M * BLOCK_M
        return 0

    @triton.jit
    def _load_rows(matrix, rows, length, dims, D, DOT_FP32: tl.constexpr):
        """Rows `rows` of one head's [length, D] matrix as a [rows, BLOCK_D] block, zero outside; float32 when the
        products run in float32."""
        block = tl.load(matrix + rows[:, None] * D + dims[None, :], mask=(rows[:, None] < length) & (dims[None, :] < D),
                        other=0.0)
        if DOT_FP32:
            block = block.to(tl.float32)
        return block

    @triton.jit
    def _load_row_statistics(ROW_DOT, ROW_MAX, ROW_SUM, head, rows, LQ):
        """The backward pass's per-row inputs for rows `rows` of one head (starting at `head`): sum(dO * O), the
        forward's row maximum and row sum (1 past the end, so padding rows never divide by 0)."""
        inside = rows < LQ
        return (tl.load(ROW_DOT + head + rows, mask=inside, other=0.0),
                tl.load(ROW_MAX + head + rows, mask=inside, other=0.0),
                tl.load(ROW_SUM + head + rows, mask=inside, other=1.0))

    @triton.jit
    def _mix(x):
        """dropout_mask.mix32 on uint32: logical shifts, wrapping products."""
        x ^= x >> 16
        x *= 0x21F0AAAD
        x ^= x >> 15
        x *= 0x735A2D97
        x ^= x >> 15
        return x

    @triton.jit
    def _dropout_stream(STREAMS, bh, DROPOUT: tl.constexpr):
        """The (batch, head) pair's uint32 stream key (dropout_mask.dropout_streams, an int32 [B, H] tensor)."""
        if DROPOUT:
            return tl.load(STREAMS + bh).to(tl.uint32, bitcast=True)
        return tl.zeros([], dtype=tl.uint32)

    @triton.jit
    def _dropout_row_keys(stream, rows, DROPOUT: tl.constexpr):
        """Per query row (its index in the call): mix(stream ^ row)."""
        if DROPOUT:
            return _mix(stream ^ rows.to(tl.uint32, bitcast=True))
        return rows.to(tl.uint32, bitcast=True)

    @triton.jit
    def _dropout_keep(row_keys, cols, threshold):
        """[rows, cols] keep mask: mix(row_key ^ col) >= the uint32 threshold, compared as int32 after flipping the
        sign bit (threshold arrives as signed_threshold(p))."""
        hashed = _mix(row_keys[:, None] ^ cols[None, :].to(tl.uint32, bitcast=True))
        return (hashed ^ 0x80000000).to(tl.int32, bitcast=True) >= threshold

    @triton.jit
    def _forward_kernel(
        Q, K, V, QP, KP, W2, B2, W3, B3, KEEP, BIAS, STREAMS, OUT, ROW_MAX, ROW_SUM,
        stride_kb, stride_kh, stride_kq, stride_kk, stride_bb, stride_bh, stride_bq, stride_bk,
        H, H_KV, LQ, LK, D, dot_scale, dropout_p, threshold, per_head,
        SCORE: tl.constexpr, ADD_DOT: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, BLOCK_H: tl.constexpr,
        HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, SLOPE: tl.constexpr, CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        block, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        bh = bh.to(tl.int64)  # every per-program base offset in 64 bits: B * H * L * D may pass 2^31
        kv = (b * H_KV + h // (H // H_KV)).to(tl.int64)  # grouped-query heads share their key/value head
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + bh * LQ * D, rows, LQ, dims, D, DOT_FP32)
        keep_ptr = KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        bias_ptr = BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
        row_keys = _dropout_row_keys(_dropout_stream(STREAMS, bh, DROPOUT), rows, DROPOUT)
        group = h * per_head  # the MLP's weights: one set per head, or one shared (group 0)
        b3 = tl.load(B3 + group) if SCORE == NEURAL_ else 0.0
        row_max = tl.zeros([BLOCK_M], dtype=tl.float32) + (NEG_ if SCORE == NEURAL_ else 0.0)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, _key_end(block, LQ, LK, BLOCK_M, CAUSAL), BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = _load_rows(K + kv * LK * D, cols, LK, dims, D, DOT_FP32)
            v = _load_rows(V + kv * LK * D, cols, LK, dims, D, DOT_FP32)
            keep = _load_keep(keep_ptr, stride_kq, stride_kk, rows, cols, LQ, LK, HAS_KEEP, CAUSAL)
            bias = _load_bias(bias_ptr, stride_bq, stride_bk, rows, cols, LQ, LK, HAS_BIAS)
            values, s = _tile(q, k, QP + bh * LQ * H1, KP + bh * LK * H1, W2 + group * H2 * H1, B2 + group * H2,
                              W3 + group * H2, b3, rows, cols, LQ, LK, keep, bias, dot_scale, SCORE, ADD_DOT, H1, H2,
                              BLOCK_H, PRECISION, HAS_BIAS, SLOPE)
            if SCORE == NEURAL_ or SCORE == SOFTMAX_SQUARE_:
                new_max = tl.maximum(row_max, tl.max(values, axis=1))
                weights = tl.exp(values - new_max[:, None])
                if SCORE == SOFTMAX_SQUARE_:
                    weights = tl.where(keep, weights, 0.0)
                else:
                    weights = tl.where(cols[None, :] < LK, weights, 0.0)
                rescale = tl.exp(row_max - new_max)
                row_sum = row_sum * rescale + tl.sum(weights, axis=1)
                acc = acc * rescale[:, None]
                row_max = new_max
            else:
                weights = values
                row_sum += tl.sum(weights, axis=1)
            if DROPOUT:
                weights = tl.where(_dropout_keep(row_keys, cols, threshold), weights / (1.0 - dropout_p), 0.0)
            acc += tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
        out = acc / safe_sum[:, None]
        tl.store(OUT + bh * LQ * D + rows[:, None] * D + dims[None, :], out.to(OUT.dtype.element_ty),
                 mask=(rows[:, None] < LQ) & (dims[None, :] < D))
        tl.store(ROW_MAX + bh * LQ + rows, row_max, mask=rows < LQ)
        tl.store(ROW_SUM + bh * LQ + rows, safe_sum, mask=rows < LQ)

    @triton.jit
    def _tile_gradients(q, k, v, do, row_dot, row_max, row_sum, qp_ptr, kp_ptr, w2_ptr, b2_ptr, w3_ptr, b3,
                        rows, cols, LQ, LK, keep, bias, dot_scale, dropout_p, row_keys, threshold,
                        SCORE: tl.constexpr, ADD_DOT: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr,
                        BLOCK_H: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SLOPE: tl.constexpr):
        """One tile's backward, recomputed from the row statistics: (weights after dropout [M, N] for dV, ds [M, N]
        with dq = ds k and dk = ds^T q, and for neural dlogit [M, N] and the tile's hidden pre-activations
        [M, N, BLOCK_H]; zeros otherwise)."""
        values, s = _tile(q, k, qp_ptr, kp_ptr, w2_ptr, b2_ptr, w3_ptr, b3, rows, cols, LQ, LK, keep, bias,
                          dot_scale, SCORE, ADD_DOT, H1, H2, BLOCK_H, PRECISION, HAS_BIAS, SLOPE)
        inside = (rows[:, None] < LQ) & (cols[None, :] < LK)
        if SCORE == NEURAL_:
            weights = tl.where(inside, tl.exp(values - row_max[:, None]), 0.0) / row_sum[:, None]
        elif SCORE == SOFTMAX_SQUARE_:
            values = tl.where(keep, tl.exp(values - row_max[:, None]), 0.0)  # f, unnormalised
            weights = values / row_sum[:, None]
        else:
            weights = values / row_sum[:, None]
        grad_weights = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dL/d(weights after dropout)
        if DROPOUT:
            kept = _dropout_keep(row_keys, cols, threshold)
            weights_dropped = tl.where(kept, weights / (1.0 - dropout_p), 0.0)
            grad_weights = tl.where(kept, grad_weights / (1.0 - dropout_p), 0.0)
        else:
            weights_dropped = weights
        centred = grad_weights - row_dot[:, None]
        if SCORE == NEURAL_:
            dlogit = tl.where(keep, weights * centred, 0.0)
            ds = dlogit * dot_scale if ADD_DOT else tl.zeros_like(dlogit)
            return weights_dropped, ds, dlogit
        df = tl.where(keep, centred / row_sum[:, None], 0.0)
        if HAS_BIAS and SCORE != SOFTMAX_SQUARE_:
            df = df * tl.exp(bias)  # f = r(s) exp(bias): the ratio rule's bias scales df/ds
        if SCORE == RATIONAL_:
            denominator = 1.0 + s * s
            ds = df * 2.0 * s / (denominator * denominator)
        elif SCORE == SQUARE_:
            ds = df * 2.0 * s
        else:
            ds = df * 2.0 * s * values
        return weights_dropped, ds * dot_scale, tl.zeros_like(ds)

    @triton.jit
    def _mlp_backward(dlogit, qp, kp, w2_ptr, b2_ptr, w3_ptr, H1: tl.constexpr, H2: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_H2: tl.constexpr, SLOPE: tl.constexpr):
        """The pairwise MLP's backward on a tile: (dpre [M, N, BLOCK_H], dW2 [BLOCK_H2, BLOCK_H], db2 [BLOCK_H2],
        dW3 [BLOCK_H2], db3) with pre = qp_i + kp_j the first layer's pre-activations."""
        units, outs = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_H2)
        pre = qp[:, None, :] + kp[None, :, :]
        hidden = _activate(pre, SLOPE)
        grad_hidden = tl.zeros_like(pre)
        grad_w2 = tl.zeros([BLOCK_H2, BLOCK_H], dtype=tl.float32)
        grad_b2 = tl.zeros([BLOCK_H2], dtype=tl.float32)
        grad_w3 = tl.zeros([BLOCK_H2], dtype=tl.float32)
        for o in tl.static_range(H2):
            w2 = tl.load(w2_ptr + o * H1 + units, mask=units < H1, other=0.0)
            z = tl.sum(hidden * w2[None, None, :], axis=2) + tl.load(b2_ptr + o)
            grad_w3 += tl.where(outs == o, tl.sum(dlogit * _activate(z, SLOPE)), 0.0)
            grad_z = _activate_backward(z, dlogit * tl.load(w3_ptr + o), SLOPE)
            grad_b2 += tl.where(outs == o, tl.sum(grad_z), 0.0)
            grad_w2 += tl.where(outs[:, None] == o, tl.sum(tl.sum(grad_z[:, :, None] * hidden, axis=0), axis=0)[None, :], 0.0)
            grad_hidden += grad_z[:, :, None] * w2[None, None, :]
        grad_pre = _activate_backward(pre, grad_hidden, SLOPE)
        return grad_pre, grad_w2, grad_b2, grad_w3, tl.sum(dlogit)

    @triton.jit
    def _backward_kernel(
        Q, K, V, DO, ROW_DOT, ROW_MAX, ROW_SUM, QP, KP, W2, B2, W3, B3, KEEP, BIAS, STREAMS,
        DQ, DK, DV, DQP, DKP, GRAD_WEIGHTS,
        stride_kb, stride_kh, stride_kq, stride_kk, stride_bb, stride_bh, stride_bq, stride_bk,
        H, H_KV, LQ, LK, D, dot_scale, dropout_p, threshold, per_head,
        SCORE: tl.constexpr, ADD_DOT: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_H2: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, SLOPE: tl.constexpr,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One key block per program, looping over the query blocks that see it (FlashAttention-2's backward): dK,
        dV, dkp and the program's partial sums of the MLP weights' gradients in registers, written once; dQ and dqp
        added atomically in float32 per tile, so each tile's scores are recomputed once, not twice."""
        block, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        bh = bh.to(tl.int64)  # every per-program base offset in 64 bits
        kv = (b * H_KV + h // (H // H_KV)).to(tl.int64)
        group = h * per_head
        b3 = tl.load(B3 + group) if SCORE == NEURAL_ else 0.0
        w2_ptr, b2_ptr, w3_ptr = W2 + group * H2 * H1, B2 + group * H2, W3 + group * H2
        qp_ptr, kp_ptr = QP + bh * LQ * H1, KP + bh * LK * H1
        keep_ptr = KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        bias_ptr = BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
        stream = _dropout_stream(STREAMS, bh, DROPOUT)
        dims, units = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_H)
        own = block * BLOCK_N + tl.arange(0, BLOCK_N)
        own_mask = (own[:, None] < LK) & (dims[None, :] < D)
        k = _load_rows(K + kv * LK * D, own, LK, dims, D, DOT_FP32)
        v = _load_rows(V + kv * LK * D, own, LK, dims, D, DOT_FP32)
        kp = tl.load(kp_ptr + own[:, None] * H1 + units[None, :], mask=(own[:, None] < LK) & (units[None, :] < H1), other=0.0)
        grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        grad_kp = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        grad_w2 = tl.zeros([BLOCK_H2, BLOCK_H], dtype=tl.float32)
        grad_b2 = tl.zeros([BLOCK_H2], dtype=tl.float32)
        grad_w3 = tl.zeros([BLOCK_H2], dtype=tl.float32)
        grad_b3 = 0.0
        for start in range(_query_start(block, LQ, LK, BLOCK_M, BLOCK_N, CAUSAL), LQ, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q = _load_rows(Q + bh * LQ * D, rows, LQ, dims, D, DOT_FP32)
            do = _load_rows(DO + bh * LQ * D, rows, LQ, dims, D, DOT_FP32)
            row_dot, row_max, row_sum = _load_row_statistics(ROW_DOT, ROW_MAX, ROW_SUM, bh * LQ, rows, LQ)
            keep = _load_keep(keep_ptr, stride_kq, stride_kk, rows, own, LQ, LK, HAS_KEEP, CAUSAL)
            bias = _load_bias(bias_ptr, stride_bq, stride_bk, rows, own, LQ, LK, HAS_BIAS)
            weights, ds, dlogit = _tile_gradients(
                q, k, v, do, row_dot, row_max, row_sum, qp_ptr, kp_ptr, w2_ptr, b2_ptr, w3_ptr, b3, rows, own,
                LQ, LK, keep, bias, dot_scale, dropout_p, _dropout_row_keys(stream, rows, DROPOUT), threshold,
                SCORE, ADD_DOT, H1, H2, BLOCK_H, DROPOUT, PRECISION, HAS_BIAS, SLOPE)
            grad_v += tl.dot(tl.trans(weights).to(do.dtype), do, input_precision=PRECISION)
            grad_k += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
            grad_q = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            tl.atomic_add(DQ + bh * LQ * D + rows[:, None] * D + dims[None, :], grad_q,
                          mask=(rows[:, None] < LQ) & (dims[None, :] < D), sem="relaxed")
            if SCORE == NEURAL_:
                qp = tl.load(qp_ptr + rows[:, None] * H1 + units[None, :], mask=(rows[:, None] < LQ) & (units[None, :] < H1), other=0.0)
                grad_pre, gw2, gb2, gw3, gb3 = _mlp_backward(dlogit, qp, kp, w2_ptr, b2_ptr, w3_ptr, H1, H2, BLOCK_H,
                                                             BLOCK_H2, SLOPE)
                grad_kp += tl.sum(grad_pre, axis=0)
                tl.atomic_add(DQP + bh * LQ * H1 + rows[:, None] * H1 + units[None, :], tl.sum(grad_pre, axis=1),
                              mask=(rows[:, None] < LQ) & (units[None, :] < H1), sem="relaxed")
                grad_w2 += gw2
                grad_b2 += gb2
                grad_w3 += gw3
                grad_b3 += gb3
        if H_KV == H:
            tl.store(DK + kv * LK * D + own[:, None] * D + dims[None, :], grad_k, mask=own_mask)
            tl.store(DV + kv * LK * D + own[:, None] * D + dims[None, :], grad_v, mask=own_mask)
        else:  # the group's query heads add into their shared key/value head
            tl.atomic_add(DK + kv * LK * D + own[:, None] * D + dims[None, :], grad_k, mask=own_mask, sem="relaxed")
            tl.atomic_add(DV + kv * LK * D + own[:, None] * D + dims[None, :], grad_v, mask=own_mask, sem="relaxed")
        if SCORE == NEURAL_:
            tl.store(DKP + bh * LK * H1 + own[:, None] * H1 + units[None, :], grad_kp, mask=(own[:, None] < LK) & (units[None, :] < H1))
            # this program's partial sums: [W2 (H2 x H1), b2 (H2), W3 (H2), b3]
            size = H2 * H1 + 2 * H2 + 1
            partial = GRAD_WEIGHTS + (bh * tl.num_programs(0) + block) * size
            outs = tl.arange(0, BLOCK_H2)
            tl.store(partial + outs[:, None] * H1 + units[None, :], grad_w2, mask=(outs[:, None] < H2) & (units[None, :] < H1))
            tl.store(partial + H2 * H1 + outs, grad_b2, mask=outs < H2)
            tl.store(partial + H2 * H1 + H2 + outs, grad_w3, mask=outs < H2)
            tl.store(partial + H2 * H1 + 2 * H2, grad_b3)
