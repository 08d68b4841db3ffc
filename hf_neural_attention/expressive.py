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

from typing import Callable

import torch

from .kernel_inputs import ExpressiveKernelInputs
from .masks import Chunk, KeyMask
from .normalisation import compute_dtype
from .variant import AttentionVariant, Option, boolean, choice, grouped_matmul, tracked

EXPRESSIVE_FORMS = ("rational", "square", "softmax_square")


def _masked_row_max(squared: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """max_j s_ij^2 over the chunk's visible keys [.., rows, 1] (-inf for a row with none)."""
    if chunk.keep is None:
        return squared.amax(dim=-1, keepdim=True)
    masked = chunk.mask_columns(squared).masked_fill(~chunk.keep, float("-inf")).amax(dim=-1, keepdim=True)
    if chunk.mask_from == 0:
        return masked
    return torch.maximum(squared[..., : chunk.mask_from].amax(dim=-1, keepdim=True), masked)


class ExpressiveAttention(AttentionVariant):
    name = "expressive"
    normalisation = "ratio"
    options_spec = {
        "form": Option("rational", choice(*EXPRESSIVE_FORMS), "f(s): s^2/(1+s^2), s^2 or exp(s^2)"),
        "scale": Option(False, boolean, "multiply q.k by 1/sqrt(d_h) before squaring"),
    }

    def prepare(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float):
        # q.k with float32 results at least: squaring doubles the relative error of a half-precision product (bf16
        # q.k rounded before squaring is off by ~0.2 in softmax_square), and s^2 overflows float16 long before
        # float32. The kernels accumulate q.k in float32 from the half-precision inputs: the same numbers.
        dtype = compute_dtype(query.dtype)
        return [query.to(dtype)], [key.to(dtype)]

    def kernel_inputs(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float):
        return ExpressiveKernelInputs(self.form, scaling if self.scale else 1.0, query, key)

    def _dot(self, rows: list[torch.Tensor], shared: list[torch.Tensor], chunk: Chunk, scaling: float) -> torch.Tensor:
        scores = grouped_matmul(rows[0], shared[0][:, :, : chunk.key_end].transpose(-1, -2))  # [B, H, rows, keys]
        scores = scores.to(compute_dtype(scores.dtype))
        return scores.mul_(scaling) if self.scale else scores

    def score(self, rows: list[torch.Tensor], shared: list[torch.Tensor], chunk: Chunk, scaling: float) -> torch.Tensor:
        """f(s) for the chunk."""
        return self._f(self._dot(rows, shared, chunk, scaling), chunk, inplace=not tracked(*rows, *shared))

    def _f(self, scores: torch.Tensor, chunk: Chunk, inplace: bool) -> torch.Tensor:
        """f(s), a fresh tensor (scores are left unchanged)."""
        squared = scores.square()
        if self.form == "rational":
            denominator = squared + 1.0
            return squared.div_(denominator) if inplace else squared / denominator
        if self.form == "square":
            return squared
        # softmax_square: exp(s^2 - row max) keeps the exponential finite; the shift cancels in the ratio.
        row_max = _masked_row_max(squared.detach(), chunk).clamp_min(0.0)
        return squared.sub_(row_max).exp_() if inplace else torch.exp(squared - row_max)

    def score_vjp(self, rows, shared, chunk, scaling, needs):
        """f's derivative written out: df -> ds = df f'(s) -> dq = ds k, dk = ds^T q (no autograd graph per chunk)."""
        query_rows, keys = rows[0], shared[0][:, :, : chunk.key_end]
        scores = self._dot(rows, shared, chunk, scaling)
        values = self._f(scores, chunk, inplace=True)

        def vjp(grad_values: torch.Tensor) -> list[torch.Tensor | None]:
            grad = grad_values.mul_(scores).mul_(2.0)  # 2 s df
            if self.form == "rational":  # f' = 2s / (1 + s^2)^2
                denominator = scores.square().add_(1.0)
                grad.div_(denominator).div_(denominator)
            elif self.form == "softmax_square":  # f' = 2s f (the row shift is a constant)
                grad.mul_(values)
            if self.scale:
                grad.mul_(scaling)
            grad = grad.to(keys.dtype)
            grad_query = torch.matmul(grad, keys) if needs[0] else None
            grad_key = torch.matmul(grad.transpose(-1, -2), query_rows) if needs[1] else None  # keys :key_end
            return [grad_query, grad_key]

        return values, vjp

    def flex_score_mod(self, scaling: float) -> Callable:
        """log f(s), so that softmax(log f(s)) = f(s) / sum f(s); the raw score (FlexAttention runs with scale 1) is
        q.k. log(0) = -inf gives weight 0, as f(0) = 0 does."""
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
