"""Neural Attention (DiGiugno & Mahmood, arXiv 2502.17206): a small MLP scores every (query, key) pair.

Per head, with down-projections to d' = proj_dim (paper: max(1, d_h // 32)):
    q~_i = Wq q_i + bq,   k~_j = Wk k_j + bk                       (d_h -> d')
    s_ij = MLP([q~_i ; k~_j])   widths 2d' -> d' -> max(1, d'//2) -> 1, ReLU between layers
    a_ij = softmax_j(s_ij + mask)
No 1/sqrt(d_h) scaling (the reference defines one and never uses it). The MLP is shared by all heads unless
per_head=True. With the paper's widths the last hidden layer has a single unit, and a dead ReLU there makes every
score equal (see experiments/scorer_health.py); two remedies, off by default: activation="leaky_relu" (slope 0.01)
replaces the paper's ReLU, init="alive" starts every hidden layer after the first with a positive bias, so none is
dead at init. combine="add" scores q.k * scaling + MLP with the MLP's last layer zero-initialised, so a retrofit
starts exactly at the original model.

The first MLP layer is affine, so W1 [q~_i ; k~_j] + b1 = (A q~_i + b1) + B k~_j: a broadcast add of a per-query
and a per-key part (computed once per call) instead of the reference's repeat + cat into [b, H, n, n, 2d'].
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from .kernel_inputs import PairwiseMLPKernelInputs
from .masks import Chunk, KeyMask, whole_map
from .normalisation import as_dtype, compute_dtype, whole_map_weights
from .variant import (
    AttentionVariant, Option, boolean, choice, grouped_matmul, positive_int, positive_int_list, tracked,
)

NEURAL_COMBINE = ("replace", "add")
NEURAL_ACTIVATIONS = ("relu", "leaky_relu")
NEURAL_INITS = ("reference", "alive")
LEAKY_SLOPE = 0.01
DOWN_PROJECTIONS = ("query_down_weight", "query_down_bias", "key_down_weight", "key_down_bias")


def _linear_init_(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """nn.Linear's default init, for a stack of per-group weights [G, out, in] and biases [G, out]."""
    fan_in = weight.shape[-1]
    bound = 1.0 / math.sqrt(fan_in)
    for group in range(weight.shape[0]):
        nn.init.kaiming_uniform_(weight[group], a=math.sqrt(5))
    nn.init.uniform_(bias, -bound, bound)


class NeuralAttention(AttentionVariant):
    name = "neural"
    default_layers = "first"
    normalisation = "softmax"
    has_parameters = True
    shift_invariant = False  # the MLP sees RoPE-rotated q, k, not only their dot product
    options_spec = {
        "proj_dim": Option(None, positive_int, "d', the width q and k are projected to (default max(1, d_h // 32))"),
        "hidden_dims": Option(None, positive_int_list, "hidden widths of the MLP (default [d', max(1, d' // 2)])"),
        "per_head": Option(False, boolean, "one MLP per head instead of one shared by all heads"),
        "combine": Option("replace", choice(*NEURAL_COMBINE), "'add': q.k * scaling + MLP, last layer zero-init"),
        "activation": Option("relu", choice(*NEURAL_ACTIVATIONS),
                             "the MLP's hidden activation: the paper's relu, or leaky_relu (slope 0.01), which "
                             "cannot die"),
        "init": Option("reference", choice(*NEURAL_INITS),
                       "'reference': nn.Linear's init, as the paper's code; 'alive': hidden layers after the first "
                       "start with bias 1/sqrt(fan_in) > 0, so no unit is dead at init"),
    }

    def build(self) -> None:
        if self.proj_dim is None:
            self.proj_dim = max(1, self.head_dim // 32)
        if self.hidden_dims is None:
            self.hidden_dims = [self.proj_dim, max(1, self.proj_dim // 2)]
        groups = self.num_heads if self.per_head else 1  # one weight set per head, or one shared by all
        proj_dim, head_dim = self.proj_dim, self.head_dim
        # Parameters as [G, out, in] stacks so the shared and per-head cases run the same einsums.
        self.query_down_weight = nn.Parameter(torch.empty(groups, proj_dim, head_dim))
        self.query_down_bias = nn.Parameter(torch.empty(groups, proj_dim))
        self.key_down_weight = nn.Parameter(torch.empty(groups, proj_dim, head_dim))
        self.key_down_bias = nn.Parameter(torch.empty(groups, proj_dim))
        widths = [2 * proj_dim, *self.hidden_dims, 1]
        self.mlp_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(groups, out_dim, in_dim)) for in_dim, out_dim in zip(widths[:-1], widths[1:])]
        )
        self.mlp_biases = nn.ParameterList([nn.Parameter(torch.empty(groups, out_dim)) for out_dim in widths[1:]])

    def reset_parameters(self) -> None:
        _linear_init_(self.query_down_weight.data, self.query_down_bias.data)
        _linear_init_(self.key_down_weight.data, self.key_down_bias.data)
        for weight, bias in zip(self.mlp_weights, self.mlp_biases):
            _linear_init_(weight.data, bias.data)
        if self.init == "alive":
            # Inputs of these layers are activations (>= 0 under ReLU), so a unit with a positive bias is live at
            # least where they are small: no hidden layer is dead for every pair at init (scorer_health.py).
            for weight, bias in zip(self.mlp_weights[1:-1], self.mlp_biases[1:-1]):
                nn.init.constant_(bias, 1.0 / math.sqrt(weight.shape[-1]))
        if self.combine == "add":
            nn.init.zeros_(self.mlp_weights[-1])
            nn.init.zeros_(self.mlp_biases[-1])

    def _activate(self, hidden: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if self.activation == "leaky_relu":
            return functional.leaky_relu(hidden, LEAKY_SLOPE, inplace=inplace)
        return torch.relu_(hidden) if inplace else torch.relu(hidden)

    @property
    def heads_share_rule(self) -> bool:
        return not self.per_head

    def first_layer_parts(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first MLP layer split into its per-query part [B, H, Lq, h1] (every bias of the layer included) and
        per-key part [B, H, Lk, h1], with float32 results at least (the projections are tiny next to the pairwise
        MLP). The keys may have fewer (grouped-query) heads than the queries. Both parts are views of unit-major
        [B, H, h1, L] tensors: W x^T with the h1 outputs as rows is a far faster product than x W^T with h1 (2)
        columns, and each hidden unit's plane then reads a contiguous row."""
        dtype = compute_dtype(query.dtype)
        groups = query.shape[1] // key.shape[1]  # grouped-query keys: [B, H_kv, Lk, D]
        if groups > 1 and self.per_head:  # per-head weights need each query head's own copy of its keys
            key = key.repeat_interleave(groups, dim=1)
        query_weight, bias, key_weight = self._first_layer_weights(dtype)
        # [G, h1, d_h] @ [B, H, d_h, L] + [G, h1, 1]: a plain matmul that broadcasts over batch and heads (the key
        # cache is read once, not copied)
        query_part = torch.matmul(query_weight, as_dtype(query, dtype).transpose(-1, -2)) + bias  # [B, H, h1, Lq]
        key_part = torch.matmul(key_weight, as_dtype(key, dtype).transpose(-1, -2))  # [B, H or H_kv, h1, Lk]
        if key_part.shape[1] != query.shape[1]:  # shared weights: project each kv head once, then repeat h1 rows
            key_part = key_part.repeat_interleave(groups, dim=1)
        return query_part.transpose(-1, -2), key_part.transpose(-1, -2)

    def _first_layer_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The down-projections folded into the first layer, (x W^T + b) F^T = x (F W)^T + F b: query and key
        weights [G, h1, d_h] and every bias of the layer as one [G, h1, 1] on the query side (the smaller map in a
        decoding step)."""
        (query_weight, query_bias, key_weight, key_bias), weights, biases = self.parameters_as(dtype)
        first = weights[0]  # [G, h1, 2d']: [first_q | first_k]
        first_q, first_k = first[..., : self.proj_dim], first[..., self.proj_dim :]  # [G, h1, d'] each
        down_biases = torch.cat([query_bias, key_bias], dim=-1)[..., None]  # [G, 2d', 1]
        bias = torch.baddbmm(biases[0][..., None], first, down_biases)  # F [bq; bk] + b1
        return torch.matmul(first_q, query_weight), bias, torch.matmul(first_k, key_weight)

    def parameters_as(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(down-projections [query weight, query bias, key weight, key bias], MLP weights, MLP biases) in `dtype`,
        read from the modules' parameter dicts: reading them as attributes goes through Module.__getattr__ once
        each, a Python call a decoding step pays for (docs/benchmarks.md#decoding). Parametrized parameters leave
        those dicts; then they are read as attributes."""
        own, lists = self._parameters, self._modules
        down = [own[name] for name in DOWN_PROJECTIONS if name in own]
        weights = list(lists["mlp_weights"]._parameters.values())
        biases = list(lists["mlp_biases"]._parameters.values())
        if len(down) != len(DOWN_PROJECTIONS) or len(weights) + len(biases) != 2 * len(self.hidden_dims) + 2:
            down = [getattr(self, name) for name in DOWN_PROJECTIONS]
            weights, biases = list(self.mlp_weights), list(self.mlp_biases)
        if any(tensor.dtype != dtype for tensor in (*down, *weights, *biases)):
            down, weights, biases = ([as_dtype(t, dtype) for t in group] for group in (down, weights, biases))
        return down, weights, biases

    def prepare(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float):
        """Rows: the first layer's per-query part (and q for combine="add"); shared: its per-key part, the later
        layers' weights, then biases (and k). q.k for combine="add" has float32 results, as in the kernels."""
        query_part, key_part = self.first_layer_parts(query, key)
        work = query_part.dtype
        _, weights, biases = self.parameters_as(work)
        layers = [*weights[1:], *biases[1:-1], self._last_bias(biases)]
        if self.combine == "add":
            return [query_part, as_dtype(query, work)], [key_part, *layers, as_dtype(key, work)]
        return [query_part], [key_part, *layers]

    @staticmethod
    def _last_bias(biases: list[torch.Tensor]) -> torch.Tensor | None:
        """The last layer's bias, or None where no gradient is taken: it adds one constant to every score, which the
        softmax cancels (its gradient is exactly 0; autograd still gets it, so every parameter receives one)."""
        return biases[-1] if tracked(biases[-1]) else None

    def kernel_inputs(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float):
        if len(self.mlp_weights) != 3:
            return (f"the kernels cover neural's MLP with two hidden layers; hidden_dims={self.hidden_dims} runs the "
                    "chunked engine")
        query_part, key_part = self.first_layer_parts(query, key)
        return PairwiseMLPKernelInputs(
            query_part, key_part, self.mlp_weights[1], self.mlp_biases[1], self.mlp_weights[2], self.mlp_biases[2],
            self.activation, self.combine == "add", scaling, query, key,
        )

    def score(self, rows: list[torch.Tensor], shared: list[torch.Tensor], chunk: Chunk, scaling: float) -> torch.Tensor:
        num_layers = len(self.mlp_weights) - 1
        weights, biases = shared[1 : 1 + num_layers], shared[1 + num_layers : 1 + 2 * num_layers]
        scores = self.mlp(rows[0], shared[0][:, :, : chunk.key_end], weights, biases)  # [B, H, rows, keys]
        if self.combine == "add":
            scores = self._add_dot(scores, rows[1], shared[-1][:, :, : chunk.key_end], scaling)
        return scores

    @staticmethod
    def _add_dot(scores: torch.Tensor, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """combine="add": scores + q.k * scaling, q.k with float32 results, as in the kernels."""
        dot = grouped_matmul(query, key.transpose(-1, -2))
        return scores + dot.to(scores.dtype) * scaling

    def mlp(self, query_part: torch.Tensor, key_part: torch.Tensor, weights: list[torch.Tensor],
            biases: list[torch.Tensor]) -> torch.Tensor:
        """MLP scores [B, H, Lq, Lk] from the first layer's parts and the later layers' [G, out, in] weights, with
        the hidden units leading: [B, H, units, Lq * Lk], so each layer is one matmul [G, out, in] @ [B, H, in, pairs]
        (the weights broadcast over batch and heads; G is 1 or H) and each activation one contiguous pass. Faster on
        this CPU than units last (a matmul with a tiny inner dimension) and than one elementwise pass per weight:
        measured in results/neural_mlp_layouts.md."""
        batch, heads, q_len, units = query_part.shape
        k_len = key_part.shape[2]
        hidden = query_part.transpose(-1, -2)[..., None] + key_part.transpose(-1, -2)[..., None, :]  # [B,H,h1,Lq,Lk]
        hidden = self._activate(hidden, inplace=True).view(batch, heads, units, q_len * k_len)
        for index, (weight, bias) in enumerate(zip(weights, biases)):
            hidden = torch.matmul(weight, hidden)  # [B, H, out, Lq * Lk]
            if bias is not None:  # None: the last bias where the softmax cancels it (_last_bias)
                hidden = hidden + bias[..., None]
            if index != len(weights) - 1:
                hidden = self._activate(hidden, inplace=True)
        return hidden.view(batch, heads, q_len, k_len)

    def attention_weights(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float) -> torch.Tensor:
        """The plain path (every decoding step takes it). One MLP shared by all heads (the default) runs as 2-D
        products over all (batch, head, query, key) pairs at once, `_shared_mlp_scores`; per-head MLPs run the rule as
        prepare and score state it."""
        if self.per_head:
            return super().attention_weights(query, key, mask, scaling)
        dtype = compute_dtype(query.dtype)  # the products in float32 at least, as in first_layer_parts
        query, key = as_dtype(query, dtype), as_dtype(key, dtype)
        scores = self._shared_mlp_scores(query, key)
        if self.combine == "add":
            scores = self._add_dot(scores, query, key, scaling)
        return whole_map_weights(scores, whole_map(mask, query.shape[2], key.shape[2]), self.normalisation)

    def _shared_mlp_scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Scores [B, H, Lq, Lk] of the shared MLP from query [B, H, Lq, D] and key [B, H_kv, Lk, D], with the hidden
        units leading over every pair, [1, units, pairs]: each layer is one baddbmm with the parameters as stored
        ([1, out, in]), the keys are read once per kv head by one product, and grouped-query heads broadcast against
        their kv head. The same rule as first_layer_parts + mlp in fewer and cheaper operations, which a decoding step
        pays for one by one (docs/benchmarks.md#decoding)."""
        batch, heads, q_len, head_dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        (query_weight, query_bias, key_weight, key_bias), weights, biases = self.parameters_as(query.dtype)
        first_q, first_k = weights[0].chunk(2, dim=-1)  # [1, h1, d'] each
        # query side with every bias of the first layer, F_q (Wq q + bq) + F_k bk + b1: [1, h1, B * H * Lq]
        projected = torch.baddbmm(query_bias.mT, query_weight, query.reshape(1, -1, head_dim).mT)
        bias = torch.baddbmm(biases[0].mT, first_k, key_bias[..., None])  # [1, h1, 1]
        query_part = torch.baddbmm(bias, first_q, projected)
        # key side, (F_k Wk) k: [1, h1, B * H_kv * Lk]
        key_part = torch.bmm(torch.bmm(first_k, key_weight), key.reshape(1, -1, head_dim).mT)
        units = key_part.shape[1]
        hidden = (key_part.view(units, batch * kv_heads, 1, k_len)
                  + query_part.view(units, batch * kv_heads, heads // kv_heads * q_len, 1))  # [h1, B*H_kv, g*Lq, Lk]
        hidden = self._activate(hidden, inplace=True).view(1, units, -1)
        layers = list(zip(weights[1:], [*biases[1:-1], self._last_bias(biases)]))
        for index, (weight, bias) in enumerate(layers):
            hidden = torch.bmm(weight, hidden) if bias is None else torch.baddbmm(bias.mT, weight, hidden)
            if index != len(layers) - 1:
                hidden = self._activate(hidden, inplace=True)
        return hidden.view(batch, heads, q_len, k_len)
