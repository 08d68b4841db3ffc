"""What an attention variant is: `AttentionVariant`, the base class every variant subclasses, and `Option`, the
declaration of one of its options with its validation.

A variant states three things: its options (`options_spec`), its parameters (`build`, `reset_parameters`) and its
score rule once (`prepare` + `score`), with how scores become weights (`normalisation`); and what each engine needs:
the chunked engine needs the rule itself (and optionally its derivative, `score_vjp`), FlexAttention a
`flex_score_mod`, the fused kernels their named `kernel_inputs`. The plain path (`attention_weights`: the whole score
map under autograd, as the paper writes it) is built here; dispatch.py picks the engine.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from .kernel_inputs import KernelInputs
from .masks import Chunk, KeyMask, whole_map
from .normalisation import as_dtype, operand_dtype, whole_map_weights


# ---- option checks: each raises a ValueError naming the option and the valid values, and returns the value -------

def choice(*choices: Any) -> Callable[[str, Any], Any]:
    def check(option: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in choices:
            raise ValueError(f"{option}={value!r} is not valid; choose one of {list(choices)}")
        return value

    return check


def boolean(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be True or False; got {value!r}")
    return value


def positive_int(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1; got {value!r}")
    return value


def odd_positive_int(option: str, value: Any) -> int:
    positive_int(option, value)
    if value % 2 == 0:
        raise ValueError(f"{option} must be odd so the convolution is centred on each key; got {value}")
    return value


def positive_int_list(option: str, value: Any) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ValueError(f"{option} must be a non-empty list of integers >= 1; got {value!r}")
    return [positive_int(f"each entry of {option}", width) for width in value]


class Option:
    """One option of a variant: its default, its check (see above) and one line saying what it does. A default of
    None means "derived from the geometry" (the variant's `build` resolves it); None passes unchecked."""

    def __init__(self, default: Any, check: Callable[[str, Any], Any], doc: str) -> None:
        self.default, self.check, self.doc = default, check, doc


def tracked(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on these tensors (then a score rule must not work in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def grouped_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left [B, H, M, K] @ right [B, H_kv, K, N] -> [B, H, M, N], where H_kv divides H and each right head serves its
    group of H / H_kv consecutive left heads (grouped-query attention): the group's rows share one product instead
    of right being copied per left head."""
    batch, heads, rows, inner = left.shape
    kv_heads = right.shape[1]
    if kv_heads == heads:
        return torch.matmul(left, right)
    stacked = left.reshape(batch, kv_heads, heads // kv_heads * rows, inner)  # each group's heads as rows
    return torch.matmul(stacked, right).view(batch, heads, rows, right.shape[-1])


# Every live variant by id: the chunked engine's custom ops take this key instead of the object, so a compiled graph
# holds an int. Registered on construction and on unpickling (deepcopy), never during a traced forward.
LIVE_VARIANTS: weakref.WeakValueDictionary[int, AttentionVariant] = weakref.WeakValueDictionary()


class AttentionVariant(nn.Module):
    """Base class of the variants. Subclasses set the class attributes and implement `score` (and `prepare` when
    the rule needs more than the query rows and the keys)."""

    name: ClassVar[str]
    default_layers: ClassVar[str] = "all"  # the paper's layers when convert(layers=None): "all" or "first"
    normalisation: ClassVar[str] = "softmax"  # "softmax" (scores are logits) or "ratio" (scores are values >= 0)
    options_spec: ClassVar[dict[str, Option]] = {}
    has_parameters: ClassVar[bool] = False  # False: runs on unconverted modules (set_attn_implementation(name))
    has_chunked_path: ClassVar[bool] = True
    # Whether scores depend only on relative positions under RoPE (a function of q.k); False: left padding without
    # position_ids changes a padded row's output, and the model warns (injection.warn_left_padding_without_positions).
    shift_invariant: ClassVar[bool] = True
    flex_fully_masked: ClassVar[str] = "zero"  # what FlexAttention must give a fully masked row: "zero" or "uniform"

    @property
    def heads_share_rule(self) -> bool:
        """Whether every head scores with the same rule and nothing mixes heads, so query heads may be handed over as
        rows of one map (grouped-query decoding reads the key cache once; see dispatch.py)."""
        return not self.has_parameters

    def __init__(self, num_heads: int, head_dim: int, **options: Any) -> None:
        super().__init__()
        self._set_up(num_heads, head_dim, self.check_options(options))

    @classmethod
    def from_checked_options(cls, num_heads: int, head_dim: int, options: Mapping[str, Any]) -> AttentionVariant:
        """Built from options `check_options` returned: a caller that checked them once (apply_variant) does not
        have them checked again for every layer."""
        variant = cls.__new__(cls)
        nn.Module.__init__(variant)
        variant._set_up(num_heads, head_dim, options)
        return variant

    def _set_up(self, num_heads: int, head_dim: int, given: Mapping[str, Any]) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        for option, spec in self.options_spec.items():
            setattr(self, option, given.get(option, spec.default))
        self.build()
        self.reset_parameters()
        LIVE_VARIANTS[id(self)] = self

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        LIVE_VARIANTS[id(self)] = self

    @classmethod
    def check_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Checks option names and values (the one validation used by convert, the configs and the recipes);
        returns the given options, normalised (e.g. tuples to lists)."""
        if options is None:
            return {}
        if not isinstance(options, Mapping):
            raise ValueError(f"the options of attention variant {cls.name!r} must be a mapping; got {options!r}")
        unknown = sorted(set(options) - set(cls.options_spec))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for attention variant {cls.name!r}; "
                f"valid options are {list(cls.options_spec) or 'none'}"
            )
        return {
            option: value if value is None and cls.options_spec[option].default is None
            else cls.options_spec[option].check(option, value)
            for option, value in options.items()
        }

    @property
    def options(self) -> dict[str, Any]:
        """Every option with its resolved value (what conversion writes into the config)."""
        return {option: getattr(self, option) for option in self.options_spec}

    # ---- what a subclass states ----------------------------------------------------------------------------------

    def build(self) -> None:
        """Creates the parameters (and resolves options whose default depends on the geometry)."""

    def reset_parameters(self) -> None:
        """The variant's own initialisation of its parameters (also run on a retrofit)."""

    def prepare(
        self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Inputs of the score rule, computed once per call from query [B, H, Lq, D] and key [B, H, Lk, D] (on the
        plain path [B, H_kv, Lk, D] with grouped-query heads: take q.k with `grouped_matmul`): row inputs (indexed
        by query along dim 2; the engine slices them per chunk) and shared inputs (keys, parameters; whole). Both
        may require gradients."""
        return [query], [key]

    def score(self, rows: list[torch.Tensor], shared: list[torch.Tensor], chunk: Chunk, scaling: float) -> torch.Tensor:
        """The score rule: [B, H, end - start, key_end] scores of one chunk (logits or values, see normalisation), a
        fresh tensor. Masked positions may hold anything finite; the normalisation masks them. Called without autograd
        (may work in place), under autograd (must not, see `tracked`), on the whole map or on one chunk."""
        raise NotImplementedError

    def score_vjp(self, rows: list[torch.Tensor], shared: list[torch.Tensor], chunk: Chunk, scaling: float,
                  needs: tuple[bool, ...]):
        """Optional derivative written out: (scores, vjp) where vjp(grad_scores) gives one gradient (or None) per row
        and shared input (a shared input's may cover only its first :key_end entries along dim 2). None: the engine
        differentiates `score` with autograd."""
        return None

    def flex_score_mod(self, scaling: float) -> Callable | None:
        """Optional FlexAttention score_mod (raw q.k in, logit out) for inference; None where the rule is no
        elementwise function of q.k."""
        return None

    def kernel_inputs(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float) -> KernelInputs | str:
        """What the fused kernels need (kernel_inputs.py), or why they cannot run this variant with these options
        (said once to the user when the kernels would otherwise run)."""
        return f"no fused kernel exists for the {self.name!r} variant"

    # ---- the plain path, built from the rule -----------------------------------------------------------------------

    def attention_weights(self, query: torch.Tensor, key: torch.Tensor, mask: KeyMask, scaling: float) -> torch.Tensor:
        """Plain path: weights [B, H, Lq, Lk] (float32, or float64) of the whole map, as the paper writes them. The keys
        may have fewer (grouped-query) heads than the queries: the rules take q.k with `grouped_matmul`."""
        query, key = as_dtype(query, operand_dtype(query.dtype)), as_dtype(key, operand_dtype(key.dtype))  # fp16 -> fp32
        rows, shared = self.prepare(query, key, mask, scaling)
        chunk = whole_map(mask, query.shape[2], key.shape[2])
        return whole_map_weights(self.score(rows, shared, chunk, scaling), chunk, self.normalisation)
