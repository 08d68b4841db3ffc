"""The chunked engine: any variant's score rule, normalised and multiplied by the values in query-row chunks.

Queries are processed in row chunks; a chunk's score map is computed, normalised and multiplied by the values at once;
only the inputs and one or two numbers per query row are kept for backward, where each chunk's scores are
recomputed (FlashAttention's scheme), with the score rule differentiated by autograd chunk by chunk unless the variant
writes its derivative out (`AttentionVariant.score_vjp`). Keys that every row of a chunk masks (the future of a causal
chunk) are skipped, and mask operations touch only the columns where some row of the chunk is masked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .masks import Chunk, KeyMask, make_chunks
from .normalisation import normalisation_backward_, normalise
from .runtime import FAST_PATHS

if TYPE_CHECKING:
    from .variant import AttentionVariant


def draw_dropout_seed() -> int:
    """One seed per attention call, drawn from the global RNG (so torch.manual_seed makes training reproducible)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_scale(seed: int, chunk_index: int, shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Attention dropout of one chunk: float32 [B, H, rows, key_end] holding 0 (dropped) or 1/(1-p) (kept), from a
    generator seeded by the call's seed and the chunk's position, so backward regenerates the forward's mask without
    storing it."""
    if p >= 1.0:  # everything dropped, as nn.functional.dropout(p=1) does
        return torch.zeros(shape, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + 1_000_003 * chunk_index) % 2**63)
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(torch.float32).mul_(1.0 / (1.0 - p))


def dropout_scale_map(seed: int, chunks: list[Chunk], shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """The whole [B, H, Lq, Lk] dropout map the chunked path applies (for tests: the plain path with the same mask)."""
    scale = torch.zeros(shape, device=device)
    for index, chunk in enumerate(chunks):
        rows = (*shape[:2], chunk.end - chunk.start, chunk.key_end)
        scale[:, :, chunk.start : chunk.end, : chunk.key_end] = dropout_scale(seed, index, rows, p, device)
    return scale


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
                 num_row_inputs: int, dropout: float = 0.0, seed: int = 0) -> None:
        self.variant = variant
        self.scaling = scaling
        self.mask = mask
        self.chunks = chunks
        self.num_row_inputs = num_row_inputs
        self.dropout = dropout
        self.seed = seed

    def dropout_scale(self, index: int, weights: torch.Tensor) -> torch.Tensor | None:
        if self.dropout == 0.0:
            return None
        return dropout_scale(self.seed, index, weights.shape, self.dropout, weights.device)

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
        # Autocast off inside: the forward and the backward recompute must run the same ops in the same dtypes.
        with torch.autocast(device_type=value.device.type, enabled=False):
            output, stats = _forward_chunks(plan, value, inputs)
        ctx.plan = plan
        ctx.num_stats = len(stats)
        ctx.save_for_backward(value, *stats, *inputs)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        value, *rest = ctx.saved_tensors
        stats, inputs = rest[: ctx.num_stats], rest[ctx.num_stats :]
        with torch.autocast(device_type=value.device.type, enabled=False):
            return (None, *_backward_chunks(ctx.plan, value, stats, inputs, ctx.needs_input_grad, grad_output))


def _forward_chunks(plan: ChunkPlan, value: torch.Tensor, inputs: tuple[torch.Tensor, ...]):
    """output [B, H, Lq, D] in value's dtype, and the per-row statistics of the normalisation (float32 or float64)."""
    row_inputs, shared = inputs[: plan.num_row_inputs], list(inputs[plan.num_row_inputs :])
    q_len = row_inputs[0].shape[2]
    output = value.new_empty(value.shape[0], value.shape[1], q_len, value.shape[-1])
    rule = plan.variant.normalisation
    stats = []
    for index, chunk in enumerate(plan.chunks):
        rows = [chunk.rows_of(t) for t in row_inputs]
        weights, chunk_stats = normalise(plan.score(rows, shared, chunk), chunk, rule)
        scale = plan.dropout_scale(index, weights)
        if scale is not None:
            weights.mul_(scale)
        torch.matmul(weights.to(value.dtype), value[:, :, : chunk.key_end], out=output[:, :, chunk.start : chunk.end])
        stats.append(chunk_stats)
    return output, [torch.cat(parts, dim=2) for parts in zip(*stats)]  # each [B, H, Lq, 1]


def _backward_chunks(plan: ChunkPlan, value, stats, inputs, needs_input_grad, grad_output):
    num_rows = plan.num_row_inputs
    row_inputs, shared = inputs[:num_rows], list(inputs[num_rows:])
    needs = needs_input_grad[2:]
    grad_output = grad_output.contiguous()
    work_dtype = stats[0].dtype  # float32 (float64 for float64 inputs): what the weights were computed in

    grad_value = torch.zeros_like(value) if needs_input_grad[1] else None
    grad_rows = [torch.zeros_like(t) if need else None for t, need in zip(row_inputs, needs[:num_rows])]
    grad_shared: list[torch.Tensor | None] = [None] * len(shared)

    for index, chunk in enumerate(plan.chunks):
        start, end, key_end = chunk.start, chunk.end, chunk.key_end
        grad_out_chunk = grad_output[:, :, start:end]
        chunk_stats = tuple(s[:, :, start:end] for s in stats)
        rows = [chunk.rows_of(t) for t in row_inputs]
        scores, vjp = plan.recompute(rows, shared, chunk, needs)
        weights, _ = normalise(scores, chunk, plan.variant.normalisation, stats=chunk_stats)
        value_chunk = value[:, :, :key_end]
        grad_weights = torch.matmul(grad_out_chunk, value_chunk.transpose(-1, -2)).to(work_dtype)  # dL/d(dropped a)
        scale = plan.dropout_scale(index, weights)
        if scale is not None:
            grad_weights.mul_(scale)
        if grad_value is not None:
            dropped = weights if scale is None else weights * scale
            grad_value[:, :, :key_end] += torch.matmul(dropped.to(value.dtype).transpose(-1, -2), grad_out_chunk)
        # sum_j dL/da_ij a_ij, the row term of the normalisation derivative, from the chunk itself (a chunk holds every
        # visible key of its rows). FlashAttention's sum_d dO_id O_id is the same number in exact arithmetic, but from
        # a half-precision O it is off by O's rounding, which the derivative's cancellation then amplifies.
        row_dot = (grad_weights * weights).sum(dim=-1, keepdim=True)
        grad_scores = normalisation_backward_(grad_weights, weights, chunk_stats, row_dot, chunk,
                                              plan.variant.normalisation)
        del weights, scores, scale
        grads = vjp(grad_scores)
        for position in range(num_rows):
            if grad_rows[position] is not None and grads[position] is not None:
                grad_rows[position][:, :, start:end] += grads[position]
        for position, grad in enumerate(grads[num_rows:]):
            if grad is not None and needs[num_rows + position]:
                grad_shared[position] = _accumulate_shared(grad_shared[position], grad, shared[position])
    for position, (tensor, need) in enumerate(zip(shared, needs[num_rows:])):
        if need and grad_shared[position] is None:
            grad_shared[position] = torch.zeros_like(tensor)
    return (grad_value, *grad_rows, *grad_shared)


def chunked_attention(
    variant: AttentionVariant, value: torch.Tensor, row_inputs: list[torch.Tensor], shared_inputs: list[Any],
    mask: KeyMask, scaling: float, dropout: float = 0.0,
) -> torch.Tensor:
    """[B, H, Lq, D] attention output of a variant's score rule, computed in query-row chunks.

    row_inputs are indexed by query along dim 2 and sliced per chunk; shared_inputs (keys, parameters, ...) are
    handed whole to every chunk. Both may require gradients. dropout: attention dropout probability (training).
    """
    if not row_inputs:
        raise ValueError("chunked_attention needs at least one row input (indexed by query along dim 2)")
    batch, heads, k_len = value.shape[0], value.shape[1], value.shape[2]
    q_len = row_inputs[0].shape[2]
    chunks = make_chunks(mask, q_len, k_len, chunk_rows(batch, heads, k_len, q_len))
    seed = draw_dropout_seed() if dropout > 0.0 else 0
    plan = ChunkPlan(variant, scaling, mask, chunks, len(row_inputs), dropout=dropout, seed=seed)
    return _RowChunkedAttention.apply(plan, value, *row_inputs, *shared_inputs)
