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
from .masks import Chunk, KeyMask
from .normalisation import compute_dtype
from .variant import AttentionVariant, Option, boolean, choice, grouped_matmul, positive_int, positive_int_list

NEURAL_COMBINE = ("replace", "add")
NEURAL_ACTIVATIONS = ("relu", "leaky_relu")
NEURAL_INITS = ("reference", "alive")
LEAKY_SLOPE = 0.01


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
        query_part = torch.matmul(query_weight, query.to(dtype).transpose(-1, -2)) + bias  # [B, H, h1, Lq]
        key_part = torch.matmul(key_weight, key.to(dtype).transpose(-1, -2))  # [B, H or H_kv, h1, Lk]
        if key_part.shape[1] != query.shape[1]:  # shared weights: project each kv head once, then repeat h1 rows
            key_part = key_part.repeat_interleave(groups, dim=1)
        return query_part.transpose(-1, -2), key_part.transpose(-1, -2)

    def _first_layer_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The down-projections folded into the first layer, (x W^T + b) F^T = x (F W)^T + F b: query and key
        weights [G, h1, d_h] and every bias of the layer as one [G, h1, 1] on the query side (the smaller map in a
        decoding step)."""
        first = self.mlp_weights[0].to(dtype)  # [G, h1, 2d']: [first_q | first_k]
        first_q, first_k = first[..., : self.proj_dim], first[..., self.proj_dim :]  # [G, h1, d'] each
        down_biases = torch.cat([self.query_down_bias, self.key_down_bias], dim=-1).to(dtype)[..., None]  # [G, 2d', 1]
        bias = torch.baddbmm(self.mlp_biases[0].to(dtype)[..., None], first, down_biases)  # F [bq; bk] + b1
        return first_q @ self.query_down_weight.to(dtype), bias, first_k @ self.key_down_weight.to(dtype)

    def prepare(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float):
        """Rows: the first layer's per-query part (and q for combine="add"); shared: its per-key part, the later
        layers' weights, then biases (and k). q.k for combine="add" has float32 results, as in the kernels."""
        query_part, key_part = self.first_layer_parts(query, key)
        work = query_part.dtype
        # (a list, not a ParameterList slice: slicing builds a new Module, which costs a decoding step ~35 us)
        layers = [t.to(work) for t in (*list(self.mlp_weights)[1:], *list(self.mlp_biases)[1:])]
        if self.combine == "add":
            return [query_part, query.to(work)], [key_part, *layers, key.to(work)]
        return [query_part], [key_part, *layers]

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
            dot = grouped_matmul(rows[1], shared[-1][:, :, : chunk.key_end].transpose(-1, -2))
            scores = scores + dot.to(scores.dtype) * scaling
        return scores

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
            hidden = torch.matmul(weight, hidden) + bias[..., None]  # [B, H, out, Lq * Lk]
            if index != len(weights) - 1:
                hidden = self._activate(hidden, inplace=True)
        return hidden.view(batch, heads, q_len, k_len)
