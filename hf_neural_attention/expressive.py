"""Expressive Attention (Gros, arXiv 2407.18601): weights from the squared dot product, normalised over keys.

    s_ij = q_i . k_j (times 1/sqrt(d_h) when scale=True)
    a_ij = f(s_ij) / sum_j f(s_ij)
    f(s) = s^2 / (1 + s^2)      form="rational"  (the public re-implementation; default)
         = s^2                  form="square"
         = exp(s^2)             form="softmax_square"  (softmax of s^2)

Large for parallel and antiparallel query/key, small for orthogonal ones. The mask acts after f (a masked key gets
weight exactly 0) and a row with no positive f gets zero weights, never NaN. No parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import (
    FAST_PATHS,
    ChunkPlan,
    KeyMask,
    check_bool,
    check_choice,
    chunk_rows,
    chunked_attention,
    fast_path_applies,
    flex_inference_output,
    normalize_over_keys,
)

EXPRESSIVE_FORMS = ("rational", "square", "softmax_square")


class ExpressiveAttention(nn.Module):
    name = "expressive"
    default_layers = "all"

    def __init__(self, num_heads: int, head_dim: int, *, form: str = "rational", scale: bool = False) -> None:
        super().__init__()
        check_choice("form", form, EXPRESSIVE_FORMS)
        check_bool("scale", scale)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.form = form
        self.scale = scale

    def reset_parameters(self) -> None:
        """No parameters."""

    @property
    def options(self) -> dict:
        return {"form": self.form, "scale": self.scale}

    def values(self, query: torch.Tensor, key: torch.Tensor, keep: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """f(s) before masking and normalisation, [B, H, Lq, Lk]; `keep` only shifts softmax_square's exponent."""
        # Scores and f in float32 at least: s^2 overflows half precision long before fp32.
        compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        scores = torch.matmul(query.to(compute_dtype), key.to(compute_dtype).transpose(-1, -2))  # [B, H, Lq, Lk]
        if self.scale:
            scores = scores * scaling
        squared = scores.square()
        if self.form == "rational":
            return squared / (1.0 + squared)
        if self.form == "square":
            return squared
        # softmax_square: exp(s^2 - row max) keeps the exponential finite; the shift cancels in the ratio
        row_max = squared if keep is None else squared.masked_fill(~keep, float("-inf"))
        row_max = row_max.amax(dim=-1, keepdim=True).clamp_min(0.0).detach()
        return torch.exp(squared - row_max)

    def attention_weights(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float) -> torch.Tensor:
        return normalize_over_keys(self.values(query, key, mask.keep, scaling), mask)

    def attention_output(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: KeyMask, scaling: float,
        dropout: float, training: bool,
    ) -> tuple[torch.Tensor, None] | None:
        """Fast path, same numbers as attention_weights(...) @ value: query-row chunks that never keep an [Lq, Lk]
        map for backward (recomputed per chunk, with f's derivative written out), fully masked key blocks skipped;
        or, for inference with FAST_PATHS.flex_inference, compiled FlexAttention. None where neither applies (the
        plain path runs)."""
        if FAST_PATHS.enabled and FAST_PATHS.flex_inference and query.shape[2] * key.shape[2] >= FAST_PATHS.min_size:
            output = flex_inference_output(query, key, value, mask, self.flex_score_mod(scaling), dropout, training)
            if output is not None:
                return output, None
        if not fast_path_applies(query, key, value, dropout, training):
            return None
        batch, heads, q_len, _ = query.shape

        def chunk_values(query_rows, key_all, chunk):
            """(s, 1 + s^2 or None, f) for the chunk, without autograd; f is a fresh tensor."""
            scores = torch.matmul(query_rows, key_all[:, :, : chunk.key_end].transpose(-1, -2))
            if self.scale:
                scores.mul_(scaling)
            squared = scores.square()
            if self.form == "rational":
                denominator = squared + 1.0
                return scores, denominator, squared.div_(denominator)
            if self.form == "square":
                return scores, None, squared
            row_max = squared.amax(dim=-1, keepdim=True) if chunk.keep is None else torch.maximum(
                squared[..., : chunk.mask_from].amax(dim=-1, keepdim=True) if chunk.mask_from > 0 else
                torch.full_like(squared[..., :1], float("-inf")),
                chunk.mask_columns(squared).masked_fill(~chunk.keep, float("-inf")).amax(dim=-1, keepdim=True),
            )
            return scores, None, squared.sub_(row_max.clamp_min(0.0)).exp_()

        def score(rows, shared, chunk):
            return chunk_values(rows[0], shared[0], chunk)[2]

        def recompute(rows, shared, chunk, needs):
            query_rows, key_all = rows[0], shared[0]
            scores, denominator, values = chunk_values(query_rows, key_all, chunk)

            def vjp(grad_values):  # df -> ds = df f'(s) -> dq, dk
                grad = grad_values.mul_(scores).mul_(2.0)  # 2 s df
                if self.form == "rational":  # f' = 2s / (1 + s^2)^2
                    grad.div_(denominator).div_(denominator)
                elif self.form == "softmax_square":  # f' = 2s f (the row shift is a constant)
                    grad.mul_(values)
                if self.scale:
                    grad.mul_(scaling)
                grad_query = torch.matmul(grad, key_all[:, :, : chunk.key_end]) if needs[0] else None
                grad_key = torch.matmul(grad.transpose(-1, -2), query_rows) if needs[1] else None  # keys :key_end
                return [grad_query, grad_key]

            return values, vjp

        plan = ChunkPlan(score, "ratio", mask, chunk_rows(batch, heads, key.shape[2], q_len), 1, recompute=recompute)
        return chunked_attention(plan, value, [query], [key]), None

    def flex_score_mod(self, scaling: float):
        """FlexAttention score_mod: log f(s), so that softmax(log f(s)) = f(s) / sum f(s); the raw score (FlexAttention
        runs with scale 1) is q.k. log(0) = -inf gives weight 0, as f(0) = 0 does."""
        scale, form = (scaling if self.scale else 1.0), self.form

        def score_mod(score, batch, head, query_index, key_index):
            s = score * scale if scale != 1.0 else score
            squared = s * s
            if form == "rational":
                return torch.log(squared) - torch.log1p(squared)
            if form == "square":
                return torch.log(squared)
            return squared

        return score_mod
