"""The chunked engine: any variant's score rule, normalised and multiplied by the values in query-row chunks.

Queries are processed in row chunks; a chunk's score map is computed, normalised and multiplied by the values at once;
only the inputs and one or two numbers per query row are kept for backward, where each chunk's scores are
recomputed (FlashAttention's scheme), with the score rule differentiated by autograd chunk by chunk unless the variant
writes its derivative out (`AttentionVariant.score_vjp`). Keys that every row of a chunk masks (the future of a causal
chunk) are skipped, and mask operations touch only the columns where some row of the chunk is masked.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from .dropout_mask import dropout_scale, dropout_streams
from .masks import Chunk, KeyMask, make_chunks
from .normalisation import compute_dtype, normalisation_backward_, normalise, operand_dtype
from .runtime import current_settings
from .variant import LIVE_VARIANTS, AttentionVariant


def chunk_rows(batch: int, heads: int, k_len: int, q_len: int, device: torch.device) -> int:
    """Rows per chunk: the settings' chunk_size, or enough rows for a [B, H, rows, Lk] block of about chunk_elements
    elements (gpu_chunk_elements on CUDA), at least min_rows."""
    settings = current_settings()
    if settings.chunk_size is not None:
        return max(1, int(settings.chunk_size))
    elements = settings.gpu_chunk_elements if device.type == "cuda" else settings.chunk_elements
    rows = max(settings.min_rows, elements // max(1, batch * heads * k_len))
    return max(1, min(q_len, rows))


class ChunkPlan:
    """What the engine needs besides tensors: the variant (its score rule and normalisation), the scaling, the mask
    and the chunks."""

    def __init__(self, variant: AttentionVariant, scaling: float, mask: KeyMask, chunks: list[Chunk],
                 num_row_inputs: int, dropout: float = 0.0, streams: torch.Tensor | None = None) -> None:
        self.variant = variant
        self.scaling = scaling
        self.mask = mask
        self.chunks = chunks
        self.num_row_inputs = num_row_inputs
        self.dropout = dropout
        self.streams = streams  # int32 [B, H] dropout stream keys (dropout_mask.py)

    def dropout_scale(self, chunk: Chunk, weights: torch.Tensor) -> torch.Tensor | None:
        """The chunk's block of the call's one dropout map (the same for any chunking)."""
        if self.dropout == 0.0:
            return None
        return dropout_scale(self.streams, chunk.start, chunk.end, chunk.key_end, self.dropout, weights.dtype)

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


def _accumulator(like: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like an input, in float32 at least: a half-precision gradient summed over chunks in its own dtype
    would round once per chunk (cdape's Kerple gradients under bf16 autocast came out 3x further from float32 than
    the plain path's single product)."""
    return torch.zeros(like.shape, device=like.device, dtype=compute_dtype(like.dtype))


def _accumulate_shared(total: torch.Tensor | None, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Adds a chunk's gradient of a shared input; it may cover only the first entries along dim 2 (the chunk's keys)."""
    total = _accumulator(like) if total is None else total
    if grad.shape != like.shape:
        total[:, :, : grad.shape[2]] += grad
        return total
    return total.add_(grad)


def _forward_chunks(plan: ChunkPlan, value: torch.Tensor, inputs: tuple[torch.Tensor, ...]):
    """output [B, H, Lq, D] in value's dtype, and the per-row statistics of the normalisation (float32 or float64)."""
    row_inputs, shared = inputs[: plan.num_row_inputs], list(inputs[plan.num_row_inputs :])
    q_len = row_inputs[0].shape[2]
    output = value.new_empty(value.shape[0], value.shape[1], q_len, value.shape[-1])
    rule = plan.variant.normalisation
    stats = []
    for chunk in plan.chunks:
        rows = [chunk.rows_of(t) for t in row_inputs]
        weights, chunk_stats = normalise(plan.score(rows, shared, chunk), chunk, rule)
        scale = plan.dropout_scale(chunk, weights)
        if scale is not None:
            weights.mul_(scale)
        torch.matmul(weights.to(value.dtype), value[:, :, : chunk.key_end], out=output[:, :, chunk.start : chunk.end])
        stats.append(chunk_stats)
    return output, [torch.cat(parts, dim=2) for parts in zip(*stats)]  # each [B, H, Lq, 1]


def _backward_chunks(plan: ChunkPlan, value, stats, inputs, needs, grad_output):
    """Gradients of value and of each input (None where `needs`, value first, says none is needed)."""
    num_rows = plan.num_row_inputs
    row_inputs, shared = inputs[:num_rows], list(inputs[num_rows:])
    needs_value, needs = needs[0], needs[1:]
    grad_output = grad_output.contiguous()
    work_dtype = stats[0].dtype  # float32 (float64 for float64 inputs): what the weights were computed in

    grad_value = _accumulator(value) if needs_value else None
    grad_rows = [_accumulator(t) if need else None for t, need in zip(row_inputs, needs[:num_rows])]
    grad_shared: list[torch.Tensor | None] = [None] * len(shared)

    for chunk in plan.chunks:
        start, end, key_end = chunk.start, chunk.end, chunk.key_end
        grad_out_chunk = grad_output[:, :, start:end]
        chunk_stats = tuple(s[:, :, start:end] for s in stats)
        rows = [chunk.rows_of(t) for t in row_inputs]
        scores, vjp = plan.recompute(rows, shared, chunk, needs)
        weights, _ = normalise(scores, chunk, plan.variant.normalisation, stats=chunk_stats)
        value_chunk = value[:, :, :key_end]
        grad_weights = torch.matmul(grad_out_chunk, value_chunk.transpose(-1, -2)).to(work_dtype)  # dL/d(dropped a)
        scale = plan.dropout_scale(chunk, weights)
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
    inputs_and_grads = zip((value, *row_inputs, *shared), (grad_value, *grad_rows, *grad_shared))
    return tuple(None if grad is None else grad.to(tensor.dtype) for tensor, grad in inputs_and_grads)


# ---- the engine as a custom op: torch.compile keeps it in the model's graph (one opaque node per layer) ------------

def op_namespace(module_name: str) -> str:
    """A custom op namespace that follows a module's name: a checkpoint's copy of this folder (trust_remote_code)
    registers its own ops beside the installed package's."""
    return "hfna_" + re.sub(r"\W", "_", module_name)


_NAMESPACE = op_namespace(__name__)


def _plan(variant_key: int, value: torch.Tensor, inputs: list, keep, bias, seed, num_rows: int, scaling: float,
          dropout: float, causal: bool, pure_causal: bool, rows_per_chunk: int) -> ChunkPlan:
    variant = LIVE_VARIANTS[variant_key]
    batch, heads, k_len = value.shape[0], value.shape[1], value.shape[2]
    q_len = inputs[0].shape[2]
    mask = KeyMask.causal_pattern(q_len, k_len, value.device) if pure_causal else KeyMask(keep, bias, causal)
    streams = dropout_streams(seed, batch, heads) if dropout > 0.0 else None
    return ChunkPlan(variant, scaling, mask, make_chunks(mask, q_len, k_len, rows_per_chunk), num_rows,
                     dropout=dropout, streams=streams)


def _present(inputs: list[torch.Tensor], missing: list[bool]) -> tuple:
    """The engine's inputs with None where the caller had None (a custom op's tensor list holds no None)."""
    return tuple(None if absent else tensor for tensor, absent in zip(inputs, missing))


@torch.library.custom_op(f"{_NAMESPACE}::chunked_forward", mutates_args=())
def _chunked_forward(value: torch.Tensor, inputs: list[torch.Tensor], missing: list[bool],
                     keep: Optional[torch.Tensor], bias: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                     variant_key: int, num_rows: int, scaling: float, dropout: float, causal: bool, pure_causal: bool,
                     rows_per_chunk: int) -> list[torch.Tensor]:
    """[output [B, H, Lq, D], *row statistics [B, H, Lq, 1]] of the variant's rule in query-row chunks."""
    plan = _plan(variant_key, value, inputs, keep, bias, seed, num_rows, scaling, dropout, causal, pure_causal,
                 rows_per_chunk)
    # Autocast off inside: the forward and the backward recompute must run the same ops in the same dtypes.
    with torch.autocast(device_type=value.device.type, enabled=False):
        output, stats = _forward_chunks(plan, value, _present(inputs, missing))
    return [output, *stats]


@_chunked_forward.register_fake
def _(value, inputs, missing, keep, bias, seed, variant_key, *settings):
    q_len, work = inputs[0].shape[2], compute_dtype(inputs[0].dtype)
    stats = 2 if LIVE_VARIANTS[variant_key].normalisation == "softmax" else 1
    return [value.new_empty(*value.shape[:2], q_len, value.shape[-1]),
            *(value.new_empty(*value.shape[:2], q_len, 1, dtype=work) for _ in range(stats))]


def _autograd_inside_op():
    """Autograd back on inside a custom op's implementation, which PyTorch runs with autograd excluded: the
    backward recomputes each chunk's scores and differentiates the score rule with torch.autograd (PyTorch's private
    dispatch-key guard; the same one its own operators use)."""
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op(f"{_NAMESPACE}::chunked_backward", mutates_args=())
def _chunked_backward(grad_output: torch.Tensor, value: torch.Tensor, stats: list[torch.Tensor],
                      inputs: list[torch.Tensor], missing: list[bool], needs: list[bool],
                      keep: Optional[torch.Tensor], bias: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                      variant_key: int, num_rows: int, scaling: float, dropout: float, causal: bool,
                      pure_causal: bool, rows_per_chunk: int) -> list[torch.Tensor]:
    """Gradients of value and of each input where `needs` says so (an empty tensor elsewhere)."""
    plan = _plan(variant_key, value, inputs, keep, bias, seed, num_rows, scaling, dropout, causal, pure_causal,
                 rows_per_chunk)
    with _autograd_inside_op(), torch.autocast(device_type=value.device.type, enabled=False):
        grads = _backward_chunks(plan, value, stats, _present(inputs, missing), needs, grad_output)
    return [value.new_empty(0) if grad is None else grad for grad in grads]


@_chunked_backward.register_fake
def _(grad_output, value, stats, inputs, missing, needs, *settings):
    # contiguous, as the engine's accumulators are (an input may be a strided view)
    return [t.new_empty(t.shape) if need else value.new_empty(0) for t, need in zip((value, *inputs), needs)]


def _setup_context(ctx, inputs, output) -> None:
    value, tensors, missing, keep, bias, seed, *settings = inputs
    ctx.settings, ctx.missing, ctx.num_stats = settings, missing, len(output) - 1
    ctx.save_for_backward(value, keep, bias, seed, *output[1:], *tensors)


def _backward(ctx, grads: list[torch.Tensor]):
    value, keep, bias, seed, *rest = ctx.saved_tensors
    stats, tensors = rest[: ctx.num_stats], rest[ctx.num_stats :]
    needs_value, needs_inputs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

    needs = [needs_value, *(need and not absent for need, absent in zip(needs_inputs, ctx.missing))]
    result = _chunked_backward(grads[0], value, list(stats), list(tensors), ctx.missing, needs, keep, bias, seed,
                               *ctx.settings)
    result = [grad if need else None for grad, need in zip(result, needs)]
    return (result[0], result[1:], None, None, None, None, *(None for _ in ctx.settings))


_chunked_forward.register_autograd(_backward, setup_context=_setup_context)


def variant_chunked_attention(variant: AttentionVariant, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              mask: KeyMask, scaling: float, dropout: float = 0.0,
                              seed: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, Lq, D] output of a variant on the chunked engine from q, k, v: products in the operand dtype (float16 in
    float32), the variant's prepare, then chunked_attention."""
    query, key = (t.to(operand_dtype(t.dtype)) for t in (query, key))
    rows, shared = variant.prepare(query, key, mask, scaling)
    return chunked_attention(variant, value, rows, shared, mask, scaling, dropout, seed)


def chunked_attention(
    variant: AttentionVariant, value: torch.Tensor, row_inputs: list[torch.Tensor], shared_inputs: list[Any],
    mask: KeyMask, scaling: float, dropout: float = 0.0, seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, H, Lq, D] attention output of a variant's score rule, computed in query-row chunks.

    row_inputs are indexed by query along dim 2 and sliced per chunk; shared_inputs (keys, parameters, ...) are
    handed whole to every chunk. Both may require gradients. dropout: attention dropout probability (training), with
    the call's dropout seed (dropout_mask.draw_dropout_seed).
    """
    if not row_inputs:
        raise ValueError("chunked_attention needs at least one row input (indexed by query along dim 2)")
    if dropout > 0.0 and seed is None:
        raise ValueError("chunked_attention with dropout needs the call's dropout seed")
    batch, heads, k_len = value.shape[0], value.shape[1], value.shape[2]
    q_len = row_inputs[0].shape[2]
    inputs = [*row_inputs, *shared_inputs]
    missing = [tensor is None for tensor in inputs]
    placeholder = value.new_empty(0)
    outputs = _chunked_forward(
        value, [placeholder if absent else tensor for tensor, absent in zip(inputs, missing)], missing,
        None if mask.pure_causal else mask.keep, mask.bias, seed if dropout > 0.0 else None, id(variant),
        len(row_inputs), float(scaling), float(dropout), bool(mask.causal), mask.pure_causal,
        chunk_rows(batch, heads, k_len, q_len, value.device))
    return outputs[0]
