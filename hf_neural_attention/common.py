"""Shared tensor helpers for every attention variant: masks, head repetition, normalisation.

This file is part of the flat folder that saved checkpoints copy for `trust_remote_code`, so it imports only
torch and its siblings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, L, D] -> [B, H_kv * n_rep, L, D], each kv head repeated for its group of query heads."""
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, length, head_dim)


@dataclass
class KeyMask:
    """An attention mask split into what the variants need.

    keep: bool [B or 1, H or 1, Lq, Lk], True where the query may attend the key; None means "attend everything".
    bias: float [B or 1, H or 1, Lq, Lk], finite additive log-domain bias on kept positions; None means zero.
    causal: whether the mask came from (or stands for) a causal pattern, so a query's own slot is its last
        visible key.
    """

    keep: torch.Tensor | None
    bias: torch.Tensor | None
    causal: bool


def causal_keep(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """bool [1, 1, Lq, Lk]: bottom-right aligned causal pattern (the queries are the last Lq key slots)."""
    query_slots = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    key_slots = torch.arange(k_len, device=device)[None, :]
    return (key_slots <= query_slots)[None, None]


def split_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, k_len: int, is_causal: bool, device: torch.device
) -> KeyMask:
    """Turns the mask Transformers hands an attention function into (keep, bias).

    Accepted: None, a boolean mask (True = attend) or an additive float mask (0 = attend, the dtype's minimum or -inf =
    masked, any other finite value = a bias), broadcastable to [B, H, Lq, Lk]. A None mask on a causal module with
    several queries is never read as "no mask": the causal pattern is rebuilt, so causality cannot be lost silently.
    """
    if attention_mask is None:
        if is_causal and q_len > 1:
            return KeyMask(causal_keep(q_len, k_len, device), None, True)
        return KeyMask(None, None, is_causal)

    if attention_mask.dim() != 4 or attention_mask.shape[-1] != k_len or attention_mask.shape[-2] not in (1, q_len):
        raise ValueError(
            f"attention_mask must be 4D and broadcastable to [batch, heads, {q_len}, {k_len}]; "
            f"got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype == torch.bool:
        return KeyMask(attention_mask, None, is_causal)
    if not attention_mask.is_floating_point():
        raise ValueError(
            f"attention_mask must be boolean (True = attend) or an additive float mask; got dtype {attention_mask.dtype}"
        )
    keep = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    bias = attention_mask.masked_fill(~keep, 0.0)
    if not bool(bias.any()):
        bias = None
    return KeyMask(keep, bias, is_causal)


def query_key_slots(mask: KeyMask, q_len: int, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute slot of every query and key, for relative-position maps |i - j|.

    Keys are the cache slots 0..Lk-1. A causal query sees exactly the keys up to its own slot, so its slot is the last
    visible key of its row; this holds for plain and cached decoding, chunked prefill and static caches alike. Without
    a causal mask the queries are the last Lq slots.
    Returns query slots [B or 1, 1, Lq, 1] and key slots [1, 1, 1, Lk], both int64.
    """
    key_slots = torch.arange(k_len, device=device)
    if mask.causal and mask.keep is not None:
        # Last True index per row; a fully masked row (a padding query) gets slot 0, its output is never used.
        last_visible = (mask.keep.any(dim=1, keepdim=True) * key_slots).amax(dim=-1)  # [B, 1, Lq]
        query_slots = last_visible[..., None]
    else:
        query_slots = torch.arange(k_len - q_len, k_len, device=device)[None, None, :, None]
    return query_slots, key_slots[None, None, None, :]


def masked_softmax(logits: torch.Tensor, mask: KeyMask) -> torch.Tensor:
    """softmax over keys of logits + bias, masked keys filled with the dtype's minimum (as Transformers' eager path).

    Computed in float32 (or float64 for float64 inputs) like the stock eager implementations; returns that dtype.
    """
    if mask.bias is not None:
        logits = logits + mask.bias
    if mask.keep is not None:
        logits = logits.masked_fill(~mask.keep, torch.finfo(logits.dtype).min)
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits, dim=-1, dtype=compute_dtype)


def normalize_over_keys(values: torch.Tensor, mask: KeyMask) -> torch.Tensor:
    """values / sum_keys values for non-negative values, masked keys exactly 0, applied after the nonlinearity.

    An additive bias b multiplies by exp(b), which is what adding b to the logits of softmax(log values) means. A row
    whose values are all zero (or all masked) gets all-zero weights instead of 0/0 = NaN.
    """
    if mask.bias is not None:
        values = values * torch.exp(mask.bias.to(values.dtype))
    if mask.keep is not None:
        values = values.masked_fill(~mask.keep, 0.0)
    row_sum = values.sum(dim=-1, keepdim=True)
    safe_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return values / safe_sum


def zero_masked(hidden: torch.Tensor, mask: KeyMask) -> torch.Tensor:
    """Zero every masked (query, key) position of a [B, C, Lq, Lk] map, as a convolution's zero padding would see it.

    The mask must be shared by all heads (a channel here is not a head), which is what Transformers builds.
    """
    if mask.keep is None:
        return hidden
    if mask.keep.shape[1] != 1:
        raise ValueError(
            f"this variant needs an attention mask shared by all heads (shape [batch, 1, Lq, Lk]); "
            f"got shape {tuple(mask.keep.shape)}"
        )
    return hidden.masked_fill(~mask.keep, 0.0)


def check_choice(option: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not valid; choose one of {list(choices)}")


def check_positive_int(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1; got {value!r}")


def check_bool(option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be True or False; got {value!r}")


# ---- fast paths ---------------------------------------------------------------------------------------------------
#
# Every variant has a plain path (`attention_weights`, then weights @ value in the integration layer) that follows its
# formula op by op and keeps every [B, H, Lq, Lk] (and wider) intermediate for backward. The fast paths give the same
# numbers (up to floating-point rounding) with far less memory and time: queries are processed in row chunks; a chunk's
# score map is computed, normalised and multiplied by the values at once; only the inputs, the output and two numbers
# per query row are kept for backward, where each chunk's scores are recomputed (FlashAttention's scheme, with the
# score function differentiated by autograd chunk by chunk unless the variant gives its own derivative). Keys that
# every row of a chunk masks (the future of a causal chunk) are skipped, and mask operations touch only the columns
# where some row of the chunk is masked. These are runtime settings, never saved with a model.


class FastPathSettings:
    """Runtime switches of the fast paths (module-level, not saved into any config).

    enabled: use a variant's fast path where it applies (float32/float64, no attention dropout in training, attention
        weights not requested, at least `min_size` query-key pairs).
    chunk_size: query rows per chunk; None picks it from `chunk_elements`.
    chunk_elements: target size (elements) of one chunk's [B, H, rows, Lk] score block when chunk_size is None.
    min_rows: the fewest rows of an automatic chunk (matrix products on fewer rows run slowly).
    min_size: smallest Lq * Lk that takes the fast path; smaller maps run the plain path.
    flex_inference: run `dot` and `expressive` through compiled FlexAttention when no gradient is needed (forward
        only; compiled on first use, and again for new shapes).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.chunk_size: int | None = None
        self.chunk_elements = 1 << 20
        self.min_rows = 64
        self.min_size = 128 * 128
        self.flex_inference = False


FAST_PATHS = FastPathSettings()


class fast_paths:  # noqa: N801 (used like a function: `with fast_paths(False): ...`)
    """Context manager over FAST_PATHS: `with fast_paths(False): ...` runs the plain paths; `fast_paths(True,
    min_size=0, chunk_size=4)` forces the chunked paths even on tiny inputs (what the tests do). Settings not given
    keep their current values; all are restored on exit. (A class, not contextlib: the checkpoint code folder imports
    only a few standard modules.)"""

    def __init__(
        self,
        enabled: bool = True,
        *,
        chunk_size: int | None = None,
        min_size: int | None = None,
        chunk_elements: int | None = None,
        flex_inference: bool | None = None,
    ) -> None:
        given = {"chunk_size": chunk_size, "min_size": min_size, "chunk_elements": chunk_elements,
                 "flex_inference": flex_inference}
        self.changes = {"enabled": enabled, **{name: value for name, value in given.items() if value is not None}}
        self.saved: list[dict] = []

    def __enter__(self) -> FastPathSettings:
        self.saved.append(dict(vars(FAST_PATHS)))
        vars(FAST_PATHS).update(self.changes)
        return FAST_PATHS

    def __exit__(self, *exc_info) -> None:
        vars(FAST_PATHS).update(self.saved.pop())


def fast_path_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, training: bool,
                      *extra: torch.Tensor) -> bool:
    """Whether a chunked fast path may run: enabled, one float32/float64 dtype throughout, no attention dropout in
    training (dropout acts on the weights, which the chunked path never keeps), a map of at least min_size pairs."""
    if not FAST_PATHS.enabled:
        return False
    if dropout > 0.0 and training:
        return False
    dtype = query.dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    if any(tensor.dtype != dtype for tensor in (key, value, *extra)):
        return False
    return query.shape[2] * key.shape[2] >= FAST_PATHS.min_size


def chunk_rows(batch: int, heads: int, k_len: int, q_len: int) -> int:
    """Rows per chunk: FAST_PATHS.chunk_size, or enough rows for a [B, H, rows, Lk] block of about chunk_elements
    elements, at least min_rows."""
    if FAST_PATHS.chunk_size is not None:
        return max(1, int(FAST_PATHS.chunk_size))
    rows = max(FAST_PATHS.min_rows, FAST_PATHS.chunk_elements // max(1, batch * heads * k_len))
    return max(1, min(q_len, rows))


class Chunk:
    """Query rows start:end against keys :key_end. Columns before mask_from are visible to every row of the chunk;
    keep is the boolean pattern of the columns mask_from:key_end (None when every column is visible) and bias the
    additive bias of all :key_end columns (None when there is none)."""

    __slots__ = ("start", "end", "key_end", "mask_from", "keep", "bias")

    def __init__(self, start, end, key_end, mask_from, keep, bias) -> None:
        self.start, self.end, self.key_end, self.mask_from, self.keep, self.bias = (
            start, end, key_end, mask_from, keep, bias)

    def mask_columns(self, tensor: torch.Tensor) -> torch.Tensor:
        """The view of a [.., rows, key_end] tensor on the columns where the chunk has masked positions."""
        return tensor[..., self.mask_from :]


def _rows_of(tensor: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    if tensor is None or tensor.shape[-2] == 1:
        return tensor
    return tensor[:, :, start:end]


def make_chunks(mask: KeyMask, q_len: int, k_len: int, rows: int) -> list[Chunk]:
    """The row chunks of a map. The key extent stops after the last key any row of the chunk may see; keys past it are
    masked for the whole chunk, so leaving them out changes nothing (their weights are exactly 0, and for cdape's
    convolution a masked key is a zero, like the padding past the end). A chunk holding a fully masked row keeps every
    key: the plain path gives such a row uniform softmax weights over all keys."""
    chunks = []
    for start in range(0, q_len, rows):
        end = min(q_len, start + rows)
        bias = _rows_of(mask.bias, start, end)
        keep = _rows_of(mask.keep, start, end)
        key_end, mask_from = k_len, k_len
        if keep is not None:
            if bool(keep.any(dim=-1).all()):
                visible = keep.flatten(0, -2).any(dim=0).nonzero()
                key_end = int(visible[-1]) + 1
            hidden_somewhere = ~keep[..., :key_end].flatten(0, -2).all(dim=0)
            masked_columns = hidden_somewhere.nonzero()
            mask_from = int(masked_columns[0]) if len(masked_columns) else key_end
            keep = keep[..., mask_from:key_end] if mask_from < key_end else None
        if bias is not None:
            bias = bias[..., :key_end]
        chunks.append(Chunk(start, end, key_end, mask_from, keep, bias))
    return chunks


class ChunkPlan:
    """What the chunked attention function needs besides tensors.

    score(rows, shared, chunk) -> [B, H, end - start, key_end]: the variant's score map for the chunk, from `rows`
        (row inputs, already sliced to the chunk's rows: tensors indexed by query along dim 2) and `shared` (everything
        else: keys, parameters). Called without autograd in forward (it may then work in place on its own tensors) and
        under autograd in backward, where it must give the same numbers. The result is a fresh tensor.
    normalise: "softmax" (scores are logits: softmax over keys of logits + bias, masked keys at the dtype's minimum,
        as masked_softmax) or "ratio" (scores are non-negative values: values * exp(bias) / row sum, masked keys 0, a
        zero row gives zero weights, as normalize_over_keys).
    recompute: optional (rows, shared, chunk, needs) -> (scores, vjp) for variants that write their score function's
        derivative out; vjp(grad_scores) -> one gradient (or None) per row and shared input, where a shared input's
        gradient may cover only its first entries along dim 2 (the chunk's keys), and may overwrite grad_scores.
        `needs` says which inputs need a gradient. By default backward runs `score` under autograd.
    """

    def __init__(self, score, normalise: str, mask: KeyMask, rows: int, num_row_inputs: int, recompute=None) -> None:
        self.score = score
        self.normalise = normalise
        self.mask = mask
        self.rows = rows
        self.num_row_inputs = num_row_inputs
        self.recompute = recompute


def _normalise_(plan: ChunkPlan, scores: torch.Tensor, chunk: Chunk):
    """In place on `scores`: the chunk's weights, and the per-row statistics that rebuild them in backward."""
    if plan.normalise == "softmax":
        if chunk.bias is not None:
            scores.add_(chunk.bias)
        if chunk.keep is not None:
            chunk.mask_columns(scores).masked_fill_(~chunk.keep, torch.finfo(scores.dtype).min)
        row_max = scores.amax(dim=-1, keepdim=True)
        weights = scores.sub_(row_max).exp_()
        row_sum = weights.sum(dim=-1, keepdim=True)
        return weights.div_(row_sum), (row_max, row_sum)
    if chunk.bias is not None:
        scores.mul_(torch.exp(chunk.bias.to(scores.dtype)))
    if chunk.keep is not None:
        chunk.mask_columns(scores).masked_fill_(~chunk.keep, 0.0)
    row_sum = scores.sum(dim=-1, keepdim=True)
    safe_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return scores.div_(safe_sum), (safe_sum,)


def _weights_from_stats(plan: ChunkPlan, scores: torch.Tensor, stats, chunk: Chunk) -> torch.Tensor:
    """The forward's weights again, from recomputed scores (left unchanged) and the saved per-row statistics."""
    if plan.normalise == "softmax":
        row_max, row_sum = stats
        logits = scores + chunk.bias if chunk.bias is not None else scores.clone()
        if chunk.keep is not None:
            chunk.mask_columns(logits).masked_fill_(~chunk.keep, torch.finfo(scores.dtype).min)
        return logits.sub_(row_max).exp_().div_(row_sum)
    (safe_sum,) = stats
    values = scores * torch.exp(chunk.bias.to(scores.dtype)) if chunk.bias is not None else scores.clone()
    if chunk.keep is not None:
        chunk.mask_columns(values).masked_fill_(~chunk.keep, 0.0)
    return values.div_(safe_sum)


def _autograd_recompute(plan: ChunkPlan, rows, shared, chunk: Chunk, needs):
    """(scores, vjp) by running the score function under autograd on detached leaves."""
    row_leaves = [t.detach().requires_grad_(need) for t, need in zip(rows, needs[: len(rows)])]
    shared_leaves = [t.detach().requires_grad_(need) for t, need in zip(shared, needs[len(rows) :])]
    with torch.enable_grad():
        scores = plan.score(row_leaves, shared_leaves, chunk)
    leaves = [*row_leaves, *shared_leaves]

    def vjp(grad_scores):
        targets = [leaf for leaf in leaves if leaf.requires_grad]
        if not targets or not scores.requires_grad:
            return [None] * len(leaves)
        grads = iter(torch.autograd.grad(scores, targets, grad_scores, allow_unused=True))
        return [next(grads) if leaf.requires_grad else None for leaf in leaves]

    return scores.detach(), vjp


class _RowChunkedAttention(torch.autograd.Function):
    """output = normalise(score(q rows, ...)) @ value, in query-row chunks, recomputing each chunk in backward."""

    @staticmethod
    def forward(ctx, plan: ChunkPlan, value: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        row_inputs, shared = inputs[: plan.num_row_inputs], inputs[plan.num_row_inputs :]
        batch, heads = value.shape[0], value.shape[1]
        q_len = row_inputs[0].shape[2]
        output = value.new_empty(batch, heads, q_len, value.shape[-1])
        chunks = make_chunks(plan.mask, q_len, value.shape[2], plan.rows)
        stats = []
        for chunk in chunks:
            rows = [t[:, :, chunk.start : chunk.end] for t in row_inputs]
            scores = plan.score(rows, shared, chunk)
            weights, chunk_stats = _normalise_(plan, scores, chunk)
            torch.matmul(weights, value[:, :, : chunk.key_end], out=output[:, :, chunk.start : chunk.end])
            stats.append(chunk_stats)
        stats = [torch.cat(parts, dim=2) for parts in zip(*stats)]  # each [B, H, Lq, 1]
        ctx.plan = plan
        ctx.chunks = chunks
        ctx.num_stats = len(stats)
        ctx.save_for_backward(value, output, *stats, *inputs)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        plan, chunks = ctx.plan, ctx.chunks
        value, output, *rest = ctx.saved_tensors
        stats, inputs = rest[: ctx.num_stats], rest[ctx.num_stats :]
        num_rows = plan.num_row_inputs
        row_inputs, shared = inputs[:num_rows], inputs[num_rows:]
        needs = ctx.needs_input_grad[2:]
        grad_output = grad_output.contiguous()

        grad_value = torch.zeros_like(value) if ctx.needs_input_grad[1] else None
        grad_rows = [torch.zeros_like(t) if need else None for t, need in zip(row_inputs, needs[:num_rows])]
        grad_shared = [None] * len(shared)
        # sum_j dL/da_ij a_ij = sum_d dO_id O_id per row: the row term of the softmax (or ratio) derivative.
        row_dot = (grad_output * output).sum(dim=-1, keepdim=True)

        for chunk in chunks:
            start, end, key_end = chunk.start, chunk.end, chunk.key_end
            grad_out_chunk = grad_output[:, :, start:end]
            chunk_stats = [s[:, :, start:end] for s in stats]
            rows = [t[:, :, start:end] for t in row_inputs]
            if plan.recompute is not None:
                scores, vjp = plan.recompute(rows, shared, chunk, needs)
            else:
                scores, vjp = _autograd_recompute(plan, rows, shared, chunk, needs)
            weights = _weights_from_stats(plan, scores, chunk_stats, chunk)
            value_chunk = value[:, :, :key_end]
            if grad_value is not None:
                grad_value[:, :, :key_end] += torch.matmul(weights.transpose(-1, -2), grad_out_chunk)
            grad_scores = torch.matmul(grad_out_chunk, value_chunk.transpose(-1, -2))  # dL/dweights
            grad_scores.sub_(row_dot[:, :, start:end])
            if plan.normalise == "softmax":
                grad_scores.mul_(weights)
            else:
                grad_scores.div_(chunk_stats[0])
                if chunk.bias is not None:
                    grad_scores.mul_(torch.exp(chunk.bias.to(grad_scores.dtype)))
            if chunk.keep is not None:
                chunk.mask_columns(grad_scores).masked_fill_(~chunk.keep, 0.0)
            del weights, scores
            grads = vjp(grad_scores)
            for index in range(num_rows):
                if grad_rows[index] is not None and grads[index] is not None:
                    grad_rows[index][:, :, start:end] += grads[index]
            for index, grad in enumerate(grads[num_rows:]):
                if grad is None or not needs[num_rows + index]:
                    continue
                if grad.shape != shared[index].shape:  # a gradient for the first keys only (dim 2)
                    if grad_shared[index] is None:
                        grad_shared[index] = torch.zeros_like(shared[index])
                    grad_shared[index][:, :, : grad.shape[2]] += grad
                elif grad_shared[index] is None:
                    grad_shared[index] = grad
                else:
                    grad_shared[index].add_(grad)
        for index, (tensor, need) in enumerate(zip(shared, needs[num_rows:])):
            if need and grad_shared[index] is None:
                grad_shared[index] = torch.zeros_like(tensor)
        return (None, grad_value, *grad_rows, *grad_shared)


def chunked_attention(
    plan: ChunkPlan, value: torch.Tensor, row_inputs: list[torch.Tensor], shared_inputs: list[torch.Tensor]
) -> torch.Tensor:
    """[B, H, Lq, D] attention output of a variant's score rule, computed in query-row chunks (see ChunkPlan)."""
    if len(row_inputs) != plan.num_row_inputs or not row_inputs:
        raise ValueError("chunked_attention: the plan's num_row_inputs must match the (non-empty) row inputs")
    return _RowChunkedAttention.apply(plan, value, *row_inputs, *shared_inputs)


_FLEX_CACHE: dict = {}


def _compiled_flex_attention():
    """torch.compile(flex_attention), built on first use (FlexAttention needs compiling to run fused on CPU)."""
    if "attention" not in _FLEX_CACHE:
        from torch.nn.attention.flex_attention import flex_attention

        # Static shapes: one compilation per shape (dynamic-shape compilation of FlexAttention fails on CPU in
        # torch 2.13; past torch._dynamo's recompile limit it runs uncompiled).
        _FLEX_CACHE["attention"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_CACHE["attention"]


def _flex_block_mask(keep: torch.Tensor, q_len: int, k_len: int):
    """FlexAttention block mask of a boolean keep pattern. The bottom-right aligned causal pattern gets an index rule
    (cheap to build); any other pattern is read from the tensor. The last mask is cached by identity, since a model
    hands the same mask tensor to every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    cached = _FLEX_CACHE.get("block_mask")
    if cached is not None and cached[0] is keep and cached[1] == (q_len, k_len):
        return cached[2]
    offset = k_len - q_len
    if bool((keep == causal_keep(q_len, k_len, keep.device)).all()):

        def mask_mod(b, h, q_index, kv_index):
            return q_index + offset >= kv_index

        block_mask = create_block_mask(mask_mod, None, None, q_len, k_len, device=keep.device)
    else:
        batch, heads = keep.shape[0], keep.shape[1]  # 1 where the pattern is shared
        pattern = keep.expand(batch, heads, q_len, k_len)

        def mask_mod(b, h, q_index, kv_index):
            return pattern[b if batch > 1 else 0, h if heads > 1 else 0, q_index, kv_index]

        block_mask = create_block_mask(
            mask_mod, batch if batch > 1 else None, heads if heads > 1 else None, q_len, k_len, device=keep.device,
            _compile=True,
        )
    _FLEX_CACHE["block_mask"] = (keep, (q_len, k_len), block_mask)
    return block_mask


def flex_inference_output(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: KeyMask, score_mod, dropout: float,
    training: bool, fully_masked: str = "zero",
) -> torch.Tensor | None:
    """[B, H, Lq, D] output of softmax(score_mod(q.k) + bias) @ value through compiled FlexAttention, or None where it
    does not apply: only without autograd (FlexAttention has no CPU backward in torch 2.13), float32, no dropout in
    training. `score_mod` gets the raw q.k (scale 1) and returns the logit. Fully masked rows: FlexAttention gives 0;
    fully_masked="uniform" replaces them by the mean of all values, as the plain softmax over the dtype's minimum does.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None
    if (dropout > 0.0 and training) or any(t.dtype != torch.float32 for t in (query, key, value)):
        return None
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return None
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    keep, bias = mask.keep, mask.bias
    block_mask = None if keep is None else _flex_block_mask(keep, q_len, k_len)
    if bias is not None:
        bias_full = bias.to(query.dtype).expand(batch, heads, q_len, k_len)

        def full_score_mod(score, b, h, q_index, kv_index):
            return score_mod(score, b, h, q_index, kv_index) + bias_full[b, h, q_index, kv_index]
    else:
        full_score_mod = score_mod
    try:
        output = _compiled_flex_attention()(
            query.contiguous(), key.contiguous(), value.contiguous(), score_mod=full_score_mod, block_mask=block_mask,
            scale=1.0,
        )
    except Exception as error:  # a compiler failure must not break inference: the chunked or plain path runs
        if not _FLEX_CACHE.get("warned"):
            _FLEX_CACHE["warned"] = True
            logging.getLogger(__name__).warning(
                "FlexAttention failed (%s: %s); the chunked or plain path runs instead", type(error).__name__,
                str(error)[:200])
        return None
    if fully_masked == "uniform" and keep is not None:
        empty = ~keep.any(dim=-1)  # [B or 1, H or 1, Lq]
        if bool(empty.any()):
            output = torch.where(empty[..., None], value.mean(dim=2, keepdim=True), output)
    return output
