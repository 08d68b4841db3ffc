"""The two ways a variant's scores become attention weights, written once for the plain and the chunked paths.

    "softmax": scores are logits; weights = softmax over keys of (scores + bias), masked keys at the dtype's
               minimum (as Transformers' eager attention, so a fully masked row gets uniform weights).
    "ratio":   scores are non-negative values f; weights = f * exp(bias) / row sum, masked keys exactly 0, and a row
               whose sum is 0 gets all-zero weights instead of 0/0.
"""

from __future__ import annotations

import torch

from .masks import Chunk

NORMALISATIONS = ("softmax", "ratio")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weights and their row statistics are computed in float32 at least (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor in dtype; itself where it already is (a no-op .to() is still a call, which a decoding step pays for)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products (matmuls, convolutions) run in: the input's, except float16, whose range (65504) scores
    exceed long before float32's; bfloat16 has float32's range and runs fast (AMX, tensor cores)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _fill_masked(scores: torch.Tensor, chunk: Chunk, value: float, inplace: bool) -> torch.Tensor:
    if chunk.keep is None:
        return scores
    if inplace:
        chunk.mask_columns(scores).masked_fill_(~chunk.keep, value)
        return scores
    if chunk.mask_from == 0:
        return scores.masked_fill(~chunk.keep, value)
    visible = chunk.keep.new_ones(*chunk.keep.shape[:-1], chunk.mask_from)
    return scores.masked_fill(~torch.cat([visible, chunk.keep], dim=-1), value)


def normalise(
    scores: torch.Tensor, chunk: Chunk, rule: str, stats: tuple[torch.Tensor, ...] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Weights [B, H, rows, key_end] of a chunk's scores, and the per-row statistics that rebuild them.

    Without `stats`, works in place on `scores` (a fresh tensor the caller gives up) unless autograd records it, and
    returns new statistics. With `stats` (from an earlier call on the same scores, as in backward), rebuilds the same
    weights and leaves `scores` unchanged.
    """
    tracked = torch.is_grad_enabled() and scores.requires_grad
    target = compute_dtype(scores.dtype)
    if scores.dtype != target:
        scores = scores.to(target)  # a copy: free to change
    elif stats is not None and not tracked:
        scores = scores.clone()
    inplace = not tracked
    bias = None if chunk.bias is None else chunk.bias.to(target)

    if rule == "softmax":
        if bias is not None:
            scores = scores.add_(bias) if inplace else scores + bias
        scores = _fill_masked(scores, chunk, torch.finfo(target).min, inplace)
        # The row max only keeps exp finite; softmax does not depend on it, so it carries no gradient.
        row_max = scores.detach().amax(dim=-1, keepdim=True) if stats is None else stats[0]
        weights = scores.sub_(row_max).exp_() if inplace else torch.exp(scores - row_max)
        row_sum = weights.sum(dim=-1, keepdim=True) if stats is None else stats[1]
        weights = weights.div_(row_sum) if inplace else weights / row_sum
        return weights, (row_max, row_sum)
    if rule == "ratio":
        if bias is not None:
            scores = scores.mul_(torch.exp(bias)) if inplace else scores * torch.exp(bias)
        scores = _fill_masked(scores, chunk, 0.0, inplace)
        if stats is None:
            row_sum = scores.sum(dim=-1, keepdim=True)
            safe_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
        else:
            (safe_sum,) = stats
        weights = scores.div_(safe_sum) if inplace else scores / safe_sum
        return weights, (safe_sum,)
    raise ValueError(f"unknown normalisation {rule!r}; valid normalisations are {list(NORMALISATIONS)}")


def whole_map_weights(scores: torch.Tensor, chunk: Chunk, rule: str) -> torch.Tensor:
    """Weights [B, H, Lq, Lk] of the whole map, without the row statistics the chunked engine keeps: the softmax is
    torch's one fused op (a one-row decoding step pays per op, not per element), with the same masking."""
    if rule != "softmax":
        return normalise(scores, chunk, rule)[0]
    target = compute_dtype(scores.dtype)
    inplace = not (torch.is_grad_enabled() and scores.requires_grad)
    scores = as_dtype(scores, target)
    if chunk.bias is not None:
        bias = chunk.bias.to(target)
        scores = scores.add_(bias) if inplace else scores + bias
    if chunk.keep is not None:
        scores = _fill_masked(scores, chunk, torch.finfo(target).min, inplace)
    return torch.softmax(scores, dim=-1)


def normalisation_backward_(
    grad_weights: torch.Tensor, weights: torch.Tensor, stats: tuple[torch.Tensor, ...], row_dot: torch.Tensor,
    chunk: Chunk, rule: str,
) -> torch.Tensor:
    """dL/dscores from dL/dweights, in place on grad_weights. row_dot [.., rows, 1] is sum_j dL/da_ij a_ij, the row
    term of both derivatives; masked positions get 0."""
    grad = grad_weights.sub_(row_dot)
    if rule == "softmax":
        grad.mul_(weights)
    else:
        grad.div_(stats[0])
        if chunk.bias is not None:
            grad.mul_(torch.exp(chunk.bias.to(grad.dtype)))
    return _fill_masked(grad, chunk, 0.0, inplace=True)
