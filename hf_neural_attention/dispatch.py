"""Which engine computes an attention call: the first that applies wins, as in PEFT's dispatchers.

    flex     compiled FlexAttention, inference only, where enabled and the variant states a score_mod
    kernels  the fused Triton kernels (CUDA, or the interpreter), where the variant gives its kernel inputs
    chunked  the chunked engine (chunked.py), any variant with a score rule
    plain    the whole score map under autograd, as the papers write it (always applies; the only path that can
             return the weights)

Every engine draws the same dropout mask (dropout_mask.py: one seed per call, keyed by position), so which engine runs
changes speed and memory, never the numbers. An engine that does not apply says why; the reasons worth a user's
attention (a GPU call leaving the kernels, a dtype the fast paths refuse, weights requested on a long sequence) are
logged once each. Autocast is off inside: the attention function has already cast q, k, v to the autocast dtype,
and each engine states the dtypes it computes in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Union

import torch

from .chunked import variant_chunked_attention
from .dropout_mask import draw_dropout_seed, dropout_scale, dropout_streams
from .flex import flex_inference_output
from .kernel_check import kernels_trusted, self_check_applies
from .masks import KeyMask
from .normalisation import as_dtype
from .runtime import (
    FastPathSettings, current_settings, fast_path_skip_reason, flex_applies, replaying_settings, triton_applies,
)
from .variant import AttentionVariant, grouped_matmul

logger = logging.getLogger(__name__)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, L, D] -> [B, H_kv * n_rep, L, D], each kv head repeated for its group of query heads."""
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, length, head_dim)


@dataclasses.dataclass
class AttentionCall:
    """One call's inputs after the attention function prepared them."""

    query: torch.Tensor  # [B, H, Lq, D]
    grouped_key: torch.Tensor  # [B, H_kv, Lk, D]: grouped-query heads as the model holds them (the kernels read them)
    grouped_value: torch.Tensor  # [B, H_kv, Lk, D]
    mask: KeyMask
    scaling: float
    dropout: float  # attention dropout probability; 0 outside training
    seed: torch.Tensor | None  # the call's dropout seed (int64 tensor), None without dropout
    settings: FastPathSettings  # the fast-path settings the call runs under (call_settings)
    # made on first use, only for the engines that need them (not functools.cached_property: its lock breaks
    # torch.compile's graph)
    _repeated: tuple[torch.Tensor, torch.Tensor] | None = dataclasses.field(default=None, init=False, repr=False)

    def _heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._repeated is None:
            groups = self.query.shape[1] // self.grouped_key.shape[1]
            self._repeated = (repeat_kv(self.grouped_key, groups), repeat_kv(self.grouped_value, groups))
        return self._repeated

    @property
    def key(self) -> torch.Tensor:
        """[B, H, Lk, D]: each kv head repeated for its query heads."""
        return self._heads()[0]

    @property
    def value(self) -> torch.Tensor:
        return self._heads()[1]


# An engine gives the output [B, H, Lq, D], a reason it does not apply (worth saying once), or None (does not apply,
# nothing to say: not enabled, a small map).
EngineResult = Union[torch.Tensor, str, None]
QUIET_REASONS = ("small map", "fast paths are disabled (fast_paths(False))")
_SAID: set[str] = set()


def flex_engine(variant: AttentionVariant, call: AttentionCall) -> EngineResult:
    if not flex_applies(call.query, call.grouped_key, call.settings):
        return None
    score_mod = variant.flex_score_mod(call.scaling)
    if score_mod is None:
        return None
    return flex_inference_output(call.query, call.key, call.value, call.mask, score_mod, call.dropout,
                                 call.dropout > 0.0, fully_masked=variant.flex_fully_masked)


def kernel_engine(variant: AttentionVariant, call: AttentionCall) -> EngineResult:
    if not triton_applies(call.query, call.settings):
        return None
    # the kernels read each kv head for its group of query heads: no repeated copy of the keys and values
    inputs = variant.kernel_inputs(call.query, call.grouped_key, call.mask, call.scaling)
    if isinstance(inputs, str):
        return f"the fused kernels do not run here: {inputs}"
    from .triton_attention import triton_attention_output  # triton is optional

    value = call.grouped_value
    if self_check_applies(value):
        distrusted = kernels_trusted(
            variant, inputs, value, lambda inputs_, value_, mask: triton_attention_output(inputs_, value_, mask))
        if distrusted is not None:
            return None  # said once by the check itself
    output = triton_attention_output(inputs, value, call.mask, call.dropout, call.seed)
    return f"the fused kernels do not run here: {output}" if isinstance(output, str) else output


def chunked_engine(variant: AttentionVariant, call: AttentionCall) -> EngineResult:
    if not variant.has_chunked_path:
        return None
    reason = fast_path_skip_reason(call.query, call.grouped_key, call.grouped_value, call.settings)  # before any repeat
    if reason is not None:
        return None if reason in QUIET_REASONS else f"the chunked fast path does not run: {reason}"
    return variant_chunked_attention(variant, call.query, call.key, call.value, call.mask, call.scaling,
                                     call.dropout, call.seed)


ENGINES: tuple[tuple[str, Callable[[AttentionVariant, AttentionCall], EngineResult]], ...] = (
    ("flex", flex_engine), ("kernels", kernel_engine), ("chunked", chunked_engine),
)


def plain_attention(variant: AttentionVariant, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole map: output [B, H, Lq, D] and the weights after dropout [B, H, Lq, Lk] in the value's dtype. Keys
    and values keep their grouped-query heads (the products read each kv head for its group)."""
    weights = variant.attention_weights(call.query, call.grouped_key, call.mask, call.scaling)  # float32/float64
    if call.dropout > 0.0:
        batch, heads, q_len, k_len = weights.shape
        streams = dropout_streams(call.seed, batch, heads)
        weights = weights * dropout_scale(streams, 0, q_len, k_len, call.dropout, weights.dtype)
    weights = as_dtype(weights, call.grouped_value.dtype)
    return grouped_matmul(weights, call.grouped_value), weights


def say_once(reason: str) -> None:
    if reason not in _SAID:
        _SAID.add(reason)
        logger.warning("hf_neural_attention: %s; the next engine runs instead (this is said once).", reason)


def _in_backward() -> bool:
    """Whether autograd's engine is running this code: a checkpointed forward being recomputed during backward."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def call_settings(variant: AttentionVariant) -> FastPathSettings:
    """The settings a call runs under: those in effect, remembered on the variant; during backward, those of the
    layer's last forward, so a recompute (activation checkpointing) takes the same engine and chunk layout as the
    first run, as non-reentrant checkpointing requires (it compares what both runs save)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # traced once / nothing to recompute
        return current_settings()
    remembered = variant.__dict__.get("_forward_settings")
    if remembered is not None and _in_backward():
        return remembered
    settings = dataclasses.replace(current_settings())
    variant.__dict__["_forward_settings"] = settings
    return settings


def groups_fold_into_rows(variant: AttentionVariant, query: torch.Tensor, key: torch.Tensor, mask: KeyMask,
                          dropout: float, weights_requested: bool) -> bool:
    """Whether a grouped-query call can run with each kv head's query heads as rows of one map: a one-query step
    (decoding) whose rule treats heads alike, whose mask is shared by the heads, without dropout (keyed by head) and
    without weights to return. Then the key/value cache is read as it is instead of copied once per query head."""
    if query.shape[1] == key.shape[1] or query.shape[2] != 1 or dropout != 0.0 or weights_requested:
        return False
    shared_by_heads = all(t is None or t.shape[1] == 1 for t in (mask.keep, mask.bias))
    return variant.heads_share_rule and shared_by_heads


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for the block (entering torch.autocast costs a decoding step more than its matmuls save)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()


def attention(variant: AttentionVariant, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: KeyMask, scaling: float, dropout: float, weights_requested: bool = False, *,
              autocast_enabled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output [B, H, Lq, D] of the first engine that applies, and the weights where the plain path ran. key and
    value may have fewer heads than the query (grouped-query attention): [B, H_kv, Lk, D]. autocast_enabled: whether
    autocast is on for the query's device, where the caller knows it already (None: looked up)."""
    groups = query.shape[1] // key.shape[1]
    if groups_fold_into_rows(variant, query, key, mask, dropout, weights_requested):
        batch, heads, _, dim = query.shape
        folded = query.reshape(batch, key.shape[1], groups, dim)  # [B, H_kv, group, D]: query heads as rows
        output, _ = attention(variant, folded, key, value, mask, scaling, 0.0, autocast_enabled=autocast_enabled)
        return output.reshape(batch, heads, 1, dim), None
    if autocast_enabled is None:
        autocast_enabled = torch.is_autocast_enabled(query.device.type)
    settings = call_settings(variant)
    if settings is current_settings() and not autocast_enabled:
        return _first_engine(variant, query, key, value, mask, scaling, dropout, weights_requested, settings)
    with replaying_settings(settings), autocast_off(query.device.type):
        return _first_engine(variant, query, key, value, mask, scaling, dropout, weights_requested, settings)


def _first_engine(variant: AttentionVariant, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  mask: KeyMask, scaling: float, dropout: float, weights_requested: bool, settings: FastPathSettings,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    seed = draw_dropout_seed(query.device) if dropout > 0.0 else None
    call = AttentionCall(query, key, value, mask, scaling, dropout, seed, settings)
    if weights_requested:
        if settings.enabled and query.shape[2] * key.shape[2] >= settings.min_size:
            say_once("attention weights were requested (output_attentions), which only the plain O(n^2) path "
                     "returns")
    else:
        for _, engine in ENGINES:
            result = engine(variant, call)
            if isinstance(result, torch.Tensor):
                return result, None
            if result is not None:
                say_once(result)
    return plain_attention(variant, call)
