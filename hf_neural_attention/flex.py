"""FlexAttention for inference: compiled `flex_attention` with a variant's score_mod, for the variants that state
one (dot, expressive) when no gradient is needed (FAST_PATHS.flex_inference).
"""

from __future__ import annotations

import logging

import torch

from .masks import KeyMask, causal_keep

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
    (cheap to build); any other pattern is read from the tensor. The last mask is cached by identity and version, since a model
    hands the same mask tensor to every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    cached = _FLEX_CACHE.get("block_mask")
    # keyed by the tensor and its version counter: an in-place edit of a reused mask buffer makes a new block mask
    key = (q_len, k_len, keep._version)
    if cached is not None and cached[0] is keep and cached[1] == key:
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
    _FLEX_CACHE["block_mask"] = (keep, key, block_mask)
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
