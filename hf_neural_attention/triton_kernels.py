"""Fused Triton kernels, forward and backward, for expressive and neural attention: tiled over query and key blocks
as FlashAttention-2 is, never writing an Lq x Lk map to memory.

Per (batch*head, query block) the forward walks the key blocks and keeps, per query row, the running sum of the
weights (and, for exp-based scores, the running max), in float32 whatever the input dtype:

    expressive rational / square   f = s^2/(1+s^2) or s^2 with s = q.k (x scaling): a running sum, no max needed
    expressive softmax_square      f = exp(s^2 - m): online softmax of s^2; masked keys weigh 0 (ratio rule)
    neural                          logit = W3 relu(W2 relu(qp_i + kp_j) + b2) + b3 (+ q.k scaling for combine="add"),
                                    online softmax; masked keys at -1e30, so a fully masked row is uniform as in eager;
                                    b3 adds the same to every logit of a row, so it cancels in the softmax: the kernels
                                    leave it out and its gradient is 0

qp and kp are the first MLP layer's per-query and per-key parts (the variant's kernel inputs, computed under
autograd, so the gradients of the down-projections flow from the kernel's dqp, dkp); the MLP runs as one 2-D plane
per hidden unit with its weights as scalars, exponentials in base 2. The backward recomputes each tile's scores from
the saved row statistics in one kernel per key block (dK, dV, dkp and per-program partial sums of the MLP weights'
gradients kept in registers and reduced once), adding dQ and dqp atomically in float32, as FlashAttention-2 does, so
the MLP and the exponentials run twice per tile in training (forward, backward), not three times. Attention dropout
is dropout_mask's position-keyed hash (a uint32 stream key per (batch, head), mixed with the query row once per row and
with the key column per element, about 10 integer operations), the same mask in forward and backward and on every
path.

Masks: any boolean keep pattern broadcastable to [B, H, Lq, Lk] (causal, padding, sliding window), read tile by tile;
a keep pattern that is exactly the bottom-right causal one is not read at all (CAUSAL: computed from the indices, and
the tiles above the diagonal are skipped, as FlashAttention does). An additive float bias (HAS_BIAS, broadcastable
the same way) is read tile by tile as the keep mask is. The neural MLP's activation is relu or leaky_relu (SLOPE). Grouped-query keys and values
may arrive once per key/value head (H_KV divides H; query head h reads kv head h // (H / H_KV)), their gradients
added per group. Per-program base offsets are 64-bit.

Triton's interpreter (TRITON_INTERPRET=1) runs these kernels on the CPU; it computes bfloat16 tl.dot
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
    LOG2E_ = tl.constexpr(1.4426950408889634)  # exp-based scores run in base 2: exp2(x log2 e) = exp(x)
    SQRT_LOG2E_ = tl.constexpr(1.2011224087864498)
    FAST_ = tl.constexpr(not interpreted())  # inline PTX (fast reciprocal) only where a GPU compiles the kernels

    @triton.jit
    def _activate(x, SLOPE: tl.constexpr):
        """The MLP's hidden activation: relu (SLOPE 0) or leaky_relu with that slope."""
        if SLOPE == 0.0:
            result = tl.maximum(x, 0.0)
        else:
            result = tl.where(x > 0, x, x * SLOPE)
        return result

    @triton.jit
    def _activate_backward(x, grad, SLOPE: tl.constexpr):
        """dL/dx from dL/d(activation(x))."""
        if SLOPE == 0.0:
            result = tl.where(x > 0, grad, 0.0)
        else:
            result = tl.where(x > 0, grad, grad * SLOPE)
        return result

    @triton.jit
    def _reciprocal(x, FAST: tl.constexpr):
        """1 / x: one MUFU.RCP on a GPU (rcp.approx, about 1 ulp), a division under the interpreter."""
        if FAST:
            y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                          pack=1)
        else:
            y = 1.0 / x
        return y

    @triton.jit
    def _mlp_planes(qp_ptr, kp_ptr, w2_ptr, b2_ptr, w3_ptr, rows, cols, LQ, LK, H1: tl.constexpr, H2: tl.constexpr,
                    SLOPE: tl.constexpr):
        """The pairwise MLP on a tile, one 2-D plane per hidden unit with its weights as scalars: (sum_o w3_o
        act(z_o) log2(e) [M, N], the logit in base 2 with log2 e folded into the last layer's weights and without the
        last bias b3, which adds the same to every logit of a row and so cancels in the softmax; pre-activations of
        the first layer (H1 planes), their activations, z (H2 planes))."""
        pre = ()
        hidden = ()
        for c in tl.static_range(H1):
            query_part = tl.load(qp_ptr + rows * H1 + c, mask=rows < LQ, other=0.0)
            key_part = tl.load(kp_ptr + cols * H1 + c, mask=cols < LK, other=0.0)
            plane = query_part[:, None] + key_part[None, :]
            pre = pre + (plane,)
            hidden = hidden + (_activate(plane, SLOPE),)
        zs = ()
        for o in tl.static_range(H2):
            z = hidden[0] * tl.load(w2_ptr + o * H1) + tl.load(b2_ptr + o)
            for c in tl.static_range(1, H1):
                z += hidden[c] * tl.load(w2_ptr + o * H1 + c)
            zs = zs + (z,)
        out = _activate(zs[0], SLOPE) * (tl.load(w3_ptr) * LOG2E_)
        for o in tl.static_range(1, H2):
            out += _activate(zs[o], SLOPE) * (tl.load(w3_ptr + o) * LOG2E_)
        return out, pre, hidden, zs

    @triton.jit
    def _mma_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, dtype: tl.constexpr):
        """[M, N] zeros from a tensor-core product of zeros: added to the neural MLP's logits it gives them the
        layout of a tl.dot result (rows over 4 lanes), where the compiler otherwise spreads each row over 32 lanes
        (5 shuffles per row reduction, and a conversion before the dot with V): one MMA per tile instead of about 10
        shuffles per pair (results/triton_compile/cost.md)."""
        return tl.dot(tl.zeros([BLOCK_M, 16], dtype=dtype), tl.zeros([16, BLOCK_N], dtype=dtype))

    @triton.jit
    def _scores(q, k, dot_scale, bias, SCORE: tl.constexpr, ADD_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
                PRECISION: tl.constexpr, FAST: tl.constexpr):
        """The expressive scores of a tile before masking: (values, s, r) with s = q.k x dot_scale, r = 1/(1+s^2)
        for rational. softmax_square works in base 2: s carries sqrt(log2 e), so values = s^2 = s_true^2 log2 e."""
        if SCORE == SOFTMAX_SQUARE_:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (dot_scale * SQRT_LOG2E_)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * dot_scale
        squared = s * s
        r = 0.0
        if SCORE == RATIONAL_:
            r = _reciprocal(1.0 + squared, FAST)
            values = squared * r
        else:
            values = squared  # square; softmax_square exponentiates with the running max
        if HAS_BIAS:
            if SCORE == SOFTMAX_SQUARE_:
                values += bias * LOG2E_
            else:
                values = values * tl.exp(bias)
        return values, s, r

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
    def _full_key_end(block, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """The end of the key tiles a query block sees whole (a multiple of BLOCK_N): those before the causal
        diagonal's first key (keys up to LK - LQ + the block's first row), and never a ragged last tile."""
        if CAUSAL:
            end = tl.minimum(LK, block * BLOCK_M + (LK - LQ) + 1)
        else:
            end = LK
        return tl.maximum(end, 0) // BLOCK_N * BLOCK_N

    @triton.jit
    def _full_query_start(block, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """The first query tile (a multiple of BLOCK_M, or LQ) from which every row sees the whole key block: the
        rows at and below the causal diagonal's last key; LQ (none) when the key block is ragged (keys past LK)."""
        last_key = block * BLOCK_N + BLOCK_N - 1
        if CAUSAL:  # query i sees keys up to i + LK - LQ
            first = tl.maximum(last_key - (LK - LQ), 0)
            start = tl.minimum((first + BLOCK_M - 1) // BLOCK_M * BLOCK_M, LQ)
        else:
            start = 0
        return tl.where(last_key < LK, start, LQ)

    @triton.jit
    def _query_start(block, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """The first query block that sees any key of a key block: causal rows above it see none."""
        if CAUSAL:
            return tl.maximum(block * BLOCK_N - (LK - LQ), 0) // BLOCK_M * BLOCK_M
        return 0

    @triton.jit
    def _inside(rows, length, dims, D: tl.constexpr, BLOCK_D: tl.constexpr):
        """[rows, BLOCK_D] mask of a head's [length, D] matrix: rows only when D fills the block (so loads and stores
        stay vectorised along the head dimension)."""
        if D == BLOCK_D:
            inside = rows[:, None] < length
        else:
            inside = (rows[:, None] < length) & (dims[None, :] < D)
        return inside

    @triton.jit
    def _load_rows(matrix, rows, length, dims, D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
                   BOUNDED: tl.constexpr = True):
        """Rows `rows` of one head's [length, D] matrix as a [rows, BLOCK_D] block, zero outside; float32 when the
        products run in float32. BOUNDED False: the rows are known to lie inside (no row compare)."""
        pointers = matrix + rows[:, None] * D + dims[None, :]
        if BOUNDED:
            block = tl.load(pointers, mask=_inside(rows, length, dims, D, BLOCK_D), other=0.0)
        elif D == BLOCK_D:
            block = tl.load(pointers)
        else:
            block = tl.load(pointers, mask=dims[None, :] < D, other=0.0)
        if DOT_FP32:
            block = block.to(tl.float32)
        return block

    @triton.jit
    def _load_row_statistics(ROW_DOT, ROW_MAX, ROW_SUM, head, rows, LQ):
        """The backward pass's per-row inputs for rows `rows` of one head (starting at `head`): sum(dO * O), the
        forward's row maximum and row sum (past the end: +inf and 1, so rows past LQ get weight 0 from any exp-based
        score without a mask, and never divide by 0)."""
        inside = rows < LQ
        return (tl.load(ROW_DOT + head + rows, mask=inside, other=0.0),
                tl.load(ROW_MAX + head + rows, mask=inside, other=float("inf")),
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
    def _program_heads(H, H_KV):
        """The program's batch b and head h (from program axis 1, b * H + h), and the 64-bit row offsets of its
        (batch, head) and of the key/value head its group of query heads shares: every per-program base offset in 64
        bits, since B * H * L * D may pass 2^31."""
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        return b, h, bh.to(tl.int64), (b * H_KV + h // (H // H_KV)).to(tl.int64)

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
    def _forward_tile(
        acc, row_max, row_sum, q, start, rows, dims, row_keys, k_head, v_head, qp_head, kp_head, w2_ptr, b2_ptr,
        w3_ptr, b3, keep_ptr, bias_ptr, stride_kq, stride_kk, stride_bq, stride_bk, LQ, LK, D: tl.constexpr,
        dot_scale, threshold, SCORE: tl.constexpr, ADD_DOT: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr,
        HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, SLOPE: tl.constexpr, CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """One key tile of the forward's online accumulation. MASKED: the tile may hold keys a row does not see
        (the causal diagonal, a keep pattern, keys past LK); otherwise every key of it is visible to every row and
        no mask is computed."""
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_head, cols, LK, dims, D, BLOCK_D, DOT_FP32, MASKED)
        v = _load_rows(v_head, cols, LK, dims, D, BLOCK_D, DOT_FP32, MASKED)
        keep = True
        if MASKED:
            keep = _load_keep(keep_ptr, stride_kq, stride_kk, rows, cols, LQ, LK, HAS_KEEP, CAUSAL)
        bias = _load_bias(bias_ptr, stride_bq, stride_bk, rows, cols, LQ, LK, HAS_BIAS)
        if SCORE == NEURAL_:  # logits in base 2 (log2 e folded into the last layer's output)
            logits, _, _, _ = _mlp_planes(qp_head, kp_head, w2_ptr, b2_ptr, w3_ptr, rows, cols, LQ, LK, H1, H2, SLOPE)
            if ADD_DOT:
                logits += tl.dot(q, tl.trans(k), input_precision=PRECISION) * (dot_scale * LOG2E_)
            else:
                logits += _mma_zeros(BLOCK_M, BLOCK_N, v.dtype)
            if HAS_BIAS:
                logits += bias * LOG2E_
            values = logits
            if MASKED:
                values = tl.where(keep, logits, NEG_)
        else:
            values, _, _ = _scores(q, k, dot_scale, bias, SCORE, ADD_DOT, HAS_BIAS, PRECISION, FAST_)
            if MASKED:
                values = tl.where(keep, values, 0.0)
        if SCORE == NEURAL_ or SCORE == SOFTMAX_SQUARE_:
            new_max = tl.maximum(row_max, tl.max(values, axis=1))
            weights = tl.exp2(values - new_max[:, None])
            if MASKED:
                if SCORE == SOFTMAX_SQUARE_:
                    weights = tl.where(keep, weights, 0.0)
                else:
                    weights = tl.where(cols[None, :] < LK, weights, 0.0)
            rescale = tl.exp2(row_max - new_max)
            row_sum = row_sum * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None]
            row_max = new_max
        else:
            weights = values
            row_sum += tl.sum(weights, axis=1)
        if DROPOUT:
            weights = tl.where(_dropout_keep(row_keys, cols, threshold), weights, 0.0)  # 1 / (1 - p) below
        acc += tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        return acc, row_max, row_sum

    @triton.jit
    def _forward_kernel(
        Q, K, V, QP, KP, W2, B2, W3, B3, KEEP, BIAS, STREAMS, OUT, ROW_MAX, ROW_SUM,
        stride_kb, stride_kh, stride_kq, stride_kk, stride_bb, stride_bh, stride_bq, stride_bk,
        H, H_KV, LQ, LK, D: tl.constexpr, dot_scale, dropout_p, threshold, per_head,
        SCORE: tl.constexpr, ADD_DOT: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, BLOCK_H: tl.constexpr,
        HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, SLOPE: tl.constexpr, CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        block = tl.program_id(0)
        b, h, bh, kv = _program_heads(H, H_KV)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + bh * LQ * D, rows, LQ, dims, D, BLOCK_D, DOT_FP32)
        keep_ptr = KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        bias_ptr = BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
        row_keys = _dropout_row_keys(_dropout_stream(STREAMS, bh, DROPOUT), rows, DROPOUT)
        group = h * per_head  # the MLP's weights: one set per head, or one shared (group 0)
        b3 = tl.load(B3 + group) if SCORE == NEURAL_ else 0.0
        w2_ptr, b2_ptr, w3_ptr = W2 + group * H2 * H1, B2 + group * H2, W3 + group * H2
        row_max = tl.zeros([BLOCK_M], dtype=tl.float32) + (NEG_ if SCORE == NEURAL_ else 0.0)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_head, v_head = K + kv * LK * D, V + kv * LK * D
        qp_head, kp_head = QP + bh * LQ * H1, KP + bh * LK * H1
        masked_start = 0
        if not HAS_KEEP:  # the key tiles every row of the block sees whole: no mask compare (FlashAttention's split)
            masked_start = _full_key_end(block, LQ, LK, BLOCK_M, BLOCK_N, CAUSAL)
            for start in range(0, masked_start, BLOCK_N):
                acc, row_max, row_sum = _forward_tile(
                    acc, row_max, row_sum, q, start, rows, dims, row_keys, k_head, v_head, qp_head, kp_head, w2_ptr,
                    b2_ptr, w3_ptr, b3, keep_ptr, bias_ptr, stride_kq, stride_kk, stride_bq, stride_bk, LQ, LK, D,
                    dot_scale, threshold, SCORE, ADD_DOT, H1, H2, HAS_KEEP, HAS_BIAS, SLOPE, CAUSAL, DROPOUT,
                    DOT_FP32, PRECISION, BLOCK_N, BLOCK_D, False, BLOCK_M)
        for start in range(masked_start, _key_end(block, LQ, LK, BLOCK_M, CAUSAL), BLOCK_N):  # diagonal, ragged
            acc, row_max, row_sum = _forward_tile(
                acc, row_max, row_sum, q, start, rows, dims, row_keys, k_head, v_head, qp_head, kp_head, w2_ptr,
                b2_ptr, w3_ptr, b3, keep_ptr, bias_ptr, stride_kq, stride_kk, stride_bq, stride_bk, LQ, LK, D,
                dot_scale, threshold, SCORE, ADD_DOT, H1, H2, HAS_KEEP, HAS_BIAS, SLOPE, CAUSAL, DROPOUT,
                DOT_FP32, PRECISION, BLOCK_N, BLOCK_D, True, BLOCK_M)
        safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
        inverse = 1.0 / safe_sum  # one reciprocal per row
        if DROPOUT:
            inverse = inverse * (1.0 / (1.0 - dropout_p))
        out = acc * inverse[:, None]
        tl.store(OUT + bh * LQ * D + rows[:, None] * D + dims[None, :], out.to(OUT.dtype.element_ty),
                 mask=_inside(rows, LQ, dims, D, BLOCK_D))
        tl.store(ROW_MAX + bh * LQ + rows, row_max, mask=rows < LQ)
        tl.store(ROW_SUM + bh * LQ + rows, safe_sum, mask=rows < LQ)

    @triton.jit
    def _fold(accumulator, tile, PER_TILE: tl.constexpr):
        """Adds a [M, N] tile into a running partial: elementwise ([M, N] planes), or summed over rows ([N])."""
        if PER_TILE:
            result = accumulator + tl.sum(tile, axis=0)
        else:
            result = accumulator + tile
        return result

    @triton.jit
    def _total(accumulator, PER_TILE: tl.constexpr, SCALAR: tl.constexpr):
        """A running partial reduced over rows ([N]), and over keys too when SCALAR."""
        if PER_TILE:
            per_key = accumulator
        else:
            per_key = tl.sum(accumulator, axis=0)
        if SCALAR:
            per_key = tl.sum(per_key, axis=0)
        return per_key

    @triton.jit
    def _backward_tile(
        start, grad_k, grad_v, acc_kp, acc_w2, acc_b2, acc_w3, acc_b3, q_head, do_head, stats_head, ROW_DOT, ROW_MAX,
        ROW_SUM, dq_head, dqp_head, qp_ptr, kp_ptr, w2_ptr, b2_ptr, w3_ptr, b3, k, v, own, dims, keep_ptr, bias_ptr,
        stride_kq, stride_kk, stride_bq, stride_bk, stream, threshold, kept_scale, dot_scale, zero, LQ, LK,
        D: tl.constexpr, SCORE: tl.constexpr, ADD_DOT: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr,
        HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, SLOPE: tl.constexpr, CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, PER_TILE: tl.constexpr,
        NEEDS_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One query tile of a key block's backward: its gradient terms added into the running accumulators. MASKED:
        the tile may hold pairs the forward masked (the causal diagonal, a keep pattern, keys past LK); otherwise
        every row sees every key (rows past LQ load zeros and a row maximum of +inf, so their weights are 0)."""
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_rows(q_head, rows, LQ, dims, D, BLOCK_D, DOT_FP32)
        do = _load_rows(do_head, rows, LQ, dims, D, BLOCK_D, DOT_FP32)
        row_dot, row_max, row_sum = _load_row_statistics(ROW_DOT, ROW_MAX, ROW_SUM, stats_head, rows, LQ)
        keep = True
        if MASKED:
            keep = _load_keep(keep_ptr, stride_kq, stride_kk, rows, own, LQ, LK, HAS_KEEP, CAUSAL)
        bias = _load_bias(bias_ptr, stride_bq, stride_bk, rows, own, LQ, LK, HAS_BIAS)
        grad_weights = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dL/d(weights after dropout)
        if DROPOUT:
            kept = _dropout_keep(_dropout_row_keys(stream, rows, DROPOUT), own, threshold)
            grad_weights = tl.where(kept, grad_weights * kept_scale, 0.0)
        centred = grad_weights - row_dot[:, None]
        if SCORE == NEURAL_:
            logits, pre, hidden, zs = _mlp_planes(qp_ptr, kp_ptr, w2_ptr, b2_ptr, w3_ptr, rows, own, LQ, LK, H1,
                                                  H2, SLOPE)
            if ADD_DOT:
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * dot_scale
                logits += s * LOG2E_
            else:
                logits += _mma_zeros(BLOCK_M, BLOCK_N, v.dtype)
            if HAS_BIAS:
                logits += bias * LOG2E_
            # weights = exp2(logit - max - log2(sum)): no division per element (the max first, so a fully
            # masked row, all logits NEG, keeps log2(sum) and gets uniform weights)
            if MASKED:
                inside = (rows[:, None] < LQ) & (own[None, :] < LK)
                shifted = tl.where(keep, logits, NEG_) - row_max[:, None]
                weights = tl.where(inside, tl.exp2(shifted - tl.log2(row_sum)[:, None]), 0.0)
                dlogit = tl.where(keep, weights * centred, 0.0)
            else:
                weights = tl.exp2(logits - (row_max + tl.log2(row_sum))[:, None])
                dlogit = weights * centred
            ds = dlogit * dot_scale
            # the MLP's backward, plane by plane
            grad_hidden = ()
            for c in tl.static_range(H1):
                grad_hidden = grad_hidden + (zero,)
            new_w2 = ()
            new_b2 = ()
            new_w3 = ()
            for o in tl.static_range(H2):
                new_w3 = new_w3 + (_fold(acc_w3[o], dlogit * _activate(zs[o], SLOPE), PER_TILE),)
                grad_z = _activate_backward(zs[o], dlogit * tl.load(w3_ptr + o), SLOPE)
                new_b2 = new_b2 + (_fold(acc_b2[o], grad_z, PER_TILE),)
                updated = ()
                for c in tl.static_range(H1):
                    new_w2 = new_w2 + (_fold(acc_w2[o * H1 + c], grad_z * hidden[c], PER_TILE),)
                    updated = updated + (grad_hidden[c] + grad_z * tl.load(w2_ptr + o * H1 + c),)
                grad_hidden = updated
            acc_w2, acc_b2, acc_w3 = new_w2, new_b2, new_w3
            new_kp = ()
            for c in tl.static_range(H1):
                grad_pre = _activate_backward(pre[c], grad_hidden[c], SLOPE)
                new_kp = new_kp + (_fold(acc_kp[c], grad_pre, PER_TILE),)
                tl.atomic_add(dqp_head + rows * H1 + c, tl.sum(grad_pre, axis=1), mask=rows < LQ,
                              sem="relaxed")
            acc_kp = new_kp
        elif SCORE == SOFTMAX_SQUARE_:
            values, s, _ = _scores(q, k, dot_scale, bias, SCORE, ADD_DOT, HAS_BIAS, PRECISION, FAST_)
            lse = row_max + tl.log2(row_sum)
            weights = tl.exp2(values - lse[:, None])
            if MASKED:
                weights = tl.where(keep, weights, 0.0)
            # d weight / d s^2 = weight (centred): s carries sqrt(log2 e), undone in the constant
            ds = weights * centred * s * (2.0 * dot_scale / SQRT_LOG2E_)
        else:
            values, s, r = _scores(q, k, dot_scale, bias, SCORE, ADD_DOT, HAS_BIAS, PRECISION, FAST_)
            inverse = 1.0 / row_sum  # one reciprocal per row
            if MASKED:
                values = tl.where(keep, values, 0.0)
                centred = tl.where(keep, centred, 0.0)
            weights = values * inverse[:, None]
            df = centred * inverse[:, None]
            if HAS_BIAS:
                df = df * tl.exp(bias)  # f = r(s) exp(bias): the ratio rule's bias scales df/ds
            if SCORE == RATIONAL_:
                ds = df * s * (r * r) * (2.0 * dot_scale)  # d/ds s^2/(1+s^2) = 2s/(1+s^2)^2
            else:
                ds = df * s * (2.0 * dot_scale)
        if DROPOUT:
            weights = tl.where(kept, weights * kept_scale, 0.0)
        grad_v += tl.dot(tl.trans(weights).to(do.dtype), do, input_precision=PRECISION)
        if NEEDS_DS:
            grad_k += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
            grad_q = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            tl.atomic_add(dq_head + rows[:, None] * D + dims[None, :], grad_q,
                          mask=_inside(rows, LQ, dims, D, BLOCK_D), sem="relaxed")
        return grad_k, grad_v, acc_kp, acc_w2, acc_b2, acc_w3, acc_b3

    @triton.jit
    def _backward_kernel(
        Q, K, V, DO, ROW_DOT, ROW_MAX, ROW_SUM, QP, KP, W2, B2, W3, B3, KEEP, BIAS, STREAMS,
        DQ, DK, DV, DQP, DKP, GRAD_WEIGHTS,
        stride_kb, stride_kh, stride_kq, stride_kk, stride_bb, stride_bh, stride_bq, stride_bk,
        H, H_KV, LQ, LK, D: tl.constexpr, dot_scale, dropout_p, threshold, per_head,
        SCORE: tl.constexpr, ADD_DOT: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_H2: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, SLOPE: tl.constexpr,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One key block per program, looping over the query blocks that see it (FlashAttention-2's backward): dK,
        dV, dkp and the program's partial sums of the MLP weights' gradients in registers, written once; dQ and dqp
        added atomically in float32 per tile, so each tile's scores are recomputed once, not twice."""
        block = tl.program_id(0)
        b, h, bh, kv = _program_heads(H, H_KV)
        group = h * per_head
        b3 = tl.load(B3 + group) if SCORE == NEURAL_ else 0.0
        w2_ptr, b2_ptr, w3_ptr = W2 + group * H2 * H1, B2 + group * H2, W3 + group * H2
        qp_ptr, kp_ptr = QP + bh * LQ * H1, KP + bh * LK * H1
        keep_ptr = KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        bias_ptr = BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
        stream = _dropout_stream(STREAMS, bh, DROPOUT)
        dims, units = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_H)
        own = block * BLOCK_N + tl.arange(0, BLOCK_N)
        own_mask = _inside(own, LK, dims, D, BLOCK_D)
        k = _load_rows(K + kv * LK * D, own, LK, dims, D, BLOCK_D, DOT_FP32)
        v = _load_rows(V + kv * LK * D, own, LK, dims, D, BLOCK_D, DOT_FP32)
        kept_scale = 1.0 / (1.0 - dropout_p)
        NEEDS_DS: tl.constexpr = SCORE != NEURAL_ or ADD_DOT  # neural replace: q.k is not in the scores
        grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # neural: every weight-gradient partial and dkp kept as [M, N] planes across the loop, reduced once at the end;
        # a wider MLP (more than 8 such planes: registers) sums each tile over its rows into [N] vectors instead
        PER_TILE: tl.constexpr = H2 * H1 + 2 * H2 + 1 + H1 > 8
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_zero = tl.zeros([BLOCK_N], dtype=tl.float32) if PER_TILE else zero
        acc_kp = ()
        for c in tl.static_range(H1):
            acc_kp = acc_kp + (acc_zero,)
        acc_w2 = ()
        for i in tl.static_range(H2 * H1):
            acc_w2 = acc_w2 + (acc_zero,)
        acc_b2 = ()
        acc_w3 = ()
        for o in tl.static_range(H2):
            acc_b2 = acc_b2 + (acc_zero,)
            acc_w3 = acc_w3 + (acc_zero,)
        acc_b3 = acc_zero
        q_head, do_head = Q + bh * LQ * D, DO + bh * LQ * D
        masked_end = LQ
        if not HAS_KEEP:
            masked_end = _full_query_start(block, LQ, LK, BLOCK_M, BLOCK_N, CAUSAL)
        # first the query tiles that see the whole key block, without a mask compare (FlashAttention's split; none
        # with a keep mask), then the diagonal and ragged ones
        for masked in tl.static_range(2):
            if masked == 1 or not HAS_KEEP:
                lo = masked_end if masked == 0 else _query_start(block, LQ, LK, BLOCK_M, BLOCK_N, CAUSAL)
                hi = LQ if masked == 0 else masked_end
                for start in range(lo, hi, BLOCK_M):
                    grad_k, grad_v, acc_kp, acc_w2, acc_b2, acc_w3, acc_b3 = _backward_tile(
                        start, grad_k, grad_v, acc_kp, acc_w2, acc_b2, acc_w3, acc_b3, q_head, do_head, bh * LQ,
                        ROW_DOT, ROW_MAX, ROW_SUM, DQ + bh * LQ * D, DQP + bh * LQ * H1, qp_ptr, kp_ptr, w2_ptr,
                        b2_ptr, w3_ptr, b3, k, v, own, dims, keep_ptr, bias_ptr, stride_kq, stride_kk, stride_bq,
                        stride_bk, stream, threshold, kept_scale, dot_scale, zero, LQ, LK, D, SCORE, ADD_DOT, H1, H2,
                        HAS_KEEP, HAS_BIAS, SLOPE, CAUSAL, DROPOUT, DOT_FP32, PRECISION, PER_TILE, NEEDS_DS, BLOCK_M,
                        BLOCK_D, masked == 1, BLOCK_N)
        if H_KV == H:
            tl.store(DK + kv * LK * D + own[:, None] * D + dims[None, :], grad_k, mask=own_mask)
            tl.store(DV + kv * LK * D + own[:, None] * D + dims[None, :], grad_v, mask=own_mask)
        else:  # the group's query heads add into their shared key/value head
            tl.atomic_add(DK + kv * LK * D + own[:, None] * D + dims[None, :], grad_k, mask=own_mask, sem="relaxed")
            tl.atomic_add(DV + kv * LK * D + own[:, None] * D + dims[None, :], grad_v, mask=own_mask, sem="relaxed")
        if SCORE == NEURAL_:
            for c in tl.static_range(H1):
                tl.store(DKP + bh * LK * H1 + own * H1 + c, _total(acc_kp[c], PER_TILE, False), mask=own < LK)
            # this program's partial sums: [W2 (H2 x H1), b2 (H2), W3 (H2), b3]
            size = H2 * H1 + 2 * H2 + 1
            partial = GRAD_WEIGHTS + (bh * tl.num_programs(0) + block) * size
            for o in tl.static_range(H2):
                for c in tl.static_range(H1):
                    tl.store(partial + o * H1 + c, _total(acc_w2[o * H1 + c], PER_TILE, True))
                tl.store(partial + H2 * H1 + o, _total(acc_b2[o], PER_TILE, True))
                tl.store(partial + H2 * H1 + H2 + o, _total(acc_w3[o], PER_TILE, True))
            tl.store(partial + H2 * H1 + 2 * H2, 0.0)  # b3: the softmax is invariant to it, its gradient is 0
