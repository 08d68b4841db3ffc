"""The chunked engine: any variant's score rule, normalised and multiplied by the values in query-row chunks.

Queries are processed in row chunks; a chunk's score map is computed, normalised and multiplied by the values at once;
only the inputs, the output and one or two numbers per query row are kept for backward, where each chunk's scores are
recomputed (FlashAttention's scheme), with the score rule differentiated by autograd chunk by chunk unless the variant
writes its derivative out (`AttentionVariant.score_vjp`). Keys that every row of a chunk masks (the future of a causal
chunk) are skipped, and mask operations touch only the columns where some row of the chunk is masked.

Part of the flat folder saved checkpoints copy for `trust_remote_code`: imports only torch and its siblings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .masks import Chunk, KeyMask, make_chunks
from .normalisation import normalisation_backward_, normalise
from .runtime import FAST_PATHS

if TYPE_CHECKING:
    from .variant import AttentionVariant


def chunk_rows(batch: int, heads: int, k_len: int, q_len: int) -> int:
    """Rows per chunk: FAST_PATHS.chunk_size, or enough rows for a [B, H, rows, Lk] block of about chunk_elements
    elements, at least min_rows."""
    if FAST_PATHS.chunk_size is not None:
        return max(1, int(FAST_PATHS.chunk_size))
    rows = max(FAST_PATHS.min_rows, FAST_PATHS.chunk_elements // max(1, batch * heads * k_len))
    return max(1, min(q_len, rows))


class ChunkPlan:
    """What the engine needs besides tensors: the variant (its score rule and normalisation), the scaling, the mask
    and the chunks."""

    def __init__(self, variant: AttentionVariant, scaling: float, mask: KeyMask, chunks: list[Chunk],
                 num_row_inputs: int) -> None:
        self.variant = variant
        self.scaling = scaling
        self.mask = mask
        self.chunks = chunks
        self.num_row_inputs = num_row_inputs

    def score(self, rows: list[torch.Tensor], shared: list[torch.Tensor], chunk: Chunk) -> torch.Tensor:
        return self.variant.score(rows, shared, chunk, self.scaling)

    def recompute(self, rows: list[torch.Tensor], shared: list[torch.Tensor], chunk: Chunk, needs: tuple[bool, ...]):
        """(scores, vjp): the variant's own derivative, or autograd through its score rule on detached leaves."""
        written_out = self.variant.score_vjp(rows, shared, chunk, self.scaling, needs)
        if written_out is not None:
            return written_out
        row_leaves = [t.detach().requires_grad_(need) for t, need in zip(rows, needs[: len(rows)])]
        shared_leaves = [t.detach().requires_grad_(need) for t, need in zip(shared, needs[len(rows) :])]
        with torch.enable_grad():
            scores = self.score(row_leaves, shared_leaves, chunk)
        leaves = [*row_leaves, *shared_leaves]

        def vjp(grad_scores: torch.Tensor) -> list[torch.Tensor | None]:
            targets = [leaf for leaf in leaves if leaf.requires_grad]
            if not targets or not scores.requires_grad:
                return [None] * len(leaves)
            grads = iter(torch.autograd.grad(scores, targets, grad_scores, allow_unused=True))
            return [next(grads) if leaf.requires_grad else None for leaf in leaves]

        return scores.detach(), vjp


def _accumulate_shared(total: torch.Tensor | None, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Adds a chunk's gradient of a shared input; it may cover only the first entries along dim 2 (the chunk's keys)."""
    if grad.shape != like.shape:
        total = torch.zeros_like(like) if total is None else total
        total[:, :, : grad.shape[2]] += grad
        return total
    return grad if total is None else total.add_(grad)


class _RowChunkedAttention(torch.autograd.Function):
    """output = normalise(score(rows, shared)) @ value, in query-row chunks, recomputing each chunk in backward."""

    @staticmethod
    def forward(ctx, plan: ChunkPlan, value: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        row_inputs, shared = inputs[: plan.num_row_inputs], inputs[plan.num_row_inputs :]
        batch, heads = value.shape[0], value.shape[1]
        q_len = row_inputs[0].shape[2]
        output = value.new_empty(batch, heads, q_len, value.shape[-1])
        rule = plan.variant.normalisation
        stats = []
        for chunk in plan.chunks:
            rows = [chunk.rows_of(t) for t in row_inputs]
            weights, chunk_stats = normalise(plan.score(rows, list(shared), chunk), chunk, rule)
            torch.matmul(weights, value[:, :, : chunk.key_end], out=output[:, :, chunk.start : chunk.end])
            stats.append(chunk_stats)
        stats = [torch.cat(parts, dim=2) for parts in zip(*stats)]  # each [B, H, Lq, 1]
        ctx.plan = plan
        ctx.num_stats = len(stats)
        ctx.save_for_backward(value, output, *stats, *inputs)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        plan = ctx.plan
        value, output, *rest = ctx.saved_tensors
        stats, inputs = rest[: ctx.num_stats], rest[ctx.num_stats :]
        num_rows = plan.num_row_inputs
        row_inputs, shared = inputs[:num_rows], list(inputs[num_rows:])
        needs = ctx.needs_input_grad[2:]
        grad_output = grad_output.contiguous()

        grad_value = torch.zeros_like(value) if ctx.needs_input_grad[1] else None
        grad_rows = [torch.zeros_like(t) if need else None for t, need in zip(row_inputs, needs[:num_rows])]
        grad_shared: list[torch.Tensor | None] = [None] * len(shared)
        row_dot = (grad_output * output).sum(dim=-1, keepdim=True)  # sum_j dL/da_ij a_ij per row

        for chunk in plan.chunks:
            start, end, key_end = chunk.start, chunk.end, chunk.key_end
            grad_out_chunk = grad_output[:, :, start:end]
            chunk_stats = tuple(s[:, :, start:end] for s in stats)
            rows = [chunk.rows_of(t) for t in row_inputs]
            scores, vjp = plan.recompute(rows, shared, chunk, needs)
            weights, _ = normalise(scores, chunk, plan.variant.normalisation, stats=chunk_stats)
            value_chunk = value[:, :, :key_end]
            if grad_value is not None:
                grad_value[:, :, :key_end] += torch.matmul(weights.transpose(-1, -2), grad_out_chunk)
            grad_weights = torch.matmul(grad_out_chunk, value_chunk.transpose(-1, -2))
            grad_scores = normalisation_backward_(grad_weights, weights, chunk_stats, row_dot[:, :, start:end], chunk,
                                                  plan.variant.normalisation)
            del weights, scores
            grads = vjp(grad_scores)
            for index in range(num_rows):
                if grad_rows[index] is not None and grads[index] is not None:
                    grad_rows[index][:, :, start:end] += grads[index]
            for index, grad in enumerate(grads[num_rows:]):
                if grad is not None and needs[num_rows + index]:
                    grad_shared[index] = _accumulate_shared(grad_shared[index], grad, shared[index])
        for index, (tensor, need) in enumerate(zip(shared, needs[num_rows:])):
            if need and grad_shared[index] is None:
                grad_shared[index] = torch.zeros_like(tensor)
        return (None, grad_value, *grad_rows, *grad_shared)


def chunked_attention(
    variant: AttentionVariant, value: torch.Tensor, row_inputs: list[torch.Tensor], shared_inputs: list[Any],
    mask: KeyMask, scaling: float,
) -> torch.Tensor:
    """[B, H, Lq, D] attention output of a variant's score rule, computed in query-row chunks.

    row_inputs are indexed by query along dim 2 and sliced per chunk; shared_inputs (keys, parameters, ...) are
    handed whole to every chunk. Both may require gradients.
    """
    if not row_inputs:
        raise ValueError("chunked_attention needs at least one row input (indexed by query along dim 2)")
    batch, heads, k_len = value.shape[0], value.shape[1], value.shape[2]
    q_len = row_inputs[0].shape[2]
    chunks = make_chunks(mask, q_len, k_len, chunk_rows(batch, heads, k_len, q_len))
    plan = ChunkPlan(variant, scaling, mask, chunks, len(row_inputs))
    return _RowChunkedAttention.apply(plan, value, *row_inputs, *shared_inputs)
