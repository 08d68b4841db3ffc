"""Runtime switches of the fast paths: module-level settings, never saved with a model.

Every variant has a plain path that computes its whole score map under autograd, and a chunked fast path that gives
the same numbers (up to rounding) with far less memory and time (see chunked.py). These settings choose between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import functools
import importlib.util
import os

import torch


@dataclass
class FastPathSettings:
    """enabled: use a variant's fast path where it applies (float32/float64, no attention dropout in training,
        attention weights not requested, at least `min_size` query-key pairs).
    chunk_size: query rows per chunk; None picks it from `chunk_elements`.
    chunk_elements: target size (elements) of one chunk's [B, H, rows, Lk] score block when chunk_size is None.
    min_rows: the fewest rows of an automatic chunk (matrix products on fewer rows run slowly).
    min_size: smallest Lq * Lk that takes the fast path; smaller maps run the plain path.
    flex_inference: run the variants that state a FlexAttention score_mod (dot, expressive) through compiled
        FlexAttention when no gradient is needed (forward only; compiled on first use, and again for new shapes).
    backend: "auto" (the fused Triton kernels for expressive and neural on CUDA tensors where triton is installed,
        else the chunked engine), "triton" (force the kernels; on CPU tensors only under TRITON_INTERPRET=1, as the
        tests run them) or "chunked" (never the kernels). See triton_attention.py.
    """

    enabled: bool = True
    chunk_size: int | None = None
    chunk_elements: int = 1 << 20
    min_rows: int = 64
    # Measured (scripts/benchmark.py, 1-layer GPT-2 d 512, 8 heads, stock dropout 0.1, fp32, forward + backward,
    # 2-core CPU, 2026-11-23), fast / plain time: n = 256: expressive 0.204 / 0.175 s, neural 0.192 /
    # 0.183, cdape 0.237 / 0.215 (plain faster); n = 512: expressive 0.36 / 0.44, neural 0.39 / 0.42, cdape
    # 0.54 / 0.67 (fast faster). The crossover lies between, so the fast path starts at n ~ 362 (n^2 = 2^17).
    min_size: int = 1 << 17
    flex_inference: bool = False
    backend: str = "auto"

    def __setattr__(self, name: str, value) -> None:
        if name == "backend" and value not in BACKENDS:
            raise ValueError(f"FAST_PATHS.backend={value!r} is not valid; choose one of {list(BACKENDS)}")
        super().__setattr__(name, value)


BACKENDS = ("auto", "triton", "chunked")
FAST_PATHS = FastPathSettings()


class fast_paths:  # noqa: N801 (used like a function: `with fast_paths(False): ...`)
    """Context manager over FAST_PATHS: `with fast_paths(False): ...` runs the plain paths; `fast_paths(True,
    min_size=0, chunk_size=4)` forces the chunked paths even on tiny inputs (what the tests do). Settings not given
    keep their current values; all are restored on exit."""

    def __init__(
        self,
        enabled: bool = True,
        *,
        chunk_size: int | None = None,
        min_size: int | None = None,
        chunk_elements: int | None = None,
        flex_inference: bool | None = None,
        backend: str | None = None,
    ) -> None:
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not valid; choose one of {list(BACKENDS)}")
        given = {"chunk_size": chunk_size, "min_size": min_size, "chunk_elements": chunk_elements,
                 "flex_inference": flex_inference, "backend": backend}
        self.changes = {"enabled": enabled, **{name: value for name, value in given.items() if value is not None}}
        self.saved: list[dict] = []

    def __enter__(self) -> FastPathSettings:
        self.saved.append(dict(vars(FAST_PATHS)))
        vars(FAST_PATHS).update(self.changes)
        return FAST_PATHS

    def __exit__(self, *exc_info) -> None:
        vars(FAST_PATHS).update(self.saved.pop())


FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def fast_path_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether a chunked fast path may run on these inputs: enabled, query, key and value in one of FAST_DTYPES
    (under autocast they arrive in its dtype), a map of at least min_size pairs. Attention dropout runs inside the
    chunked path."""
    if not FAST_PATHS.enabled:
        return False
    if query.dtype not in FAST_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    return query.shape[2] * key.shape[2] >= FAST_PATHS.min_size


def flex_applies(query: torch.Tensor, key: torch.Tensor) -> bool:
    return FAST_PATHS.enabled and FAST_PATHS.flex_inference and query.shape[2] * key.shape[2] >= FAST_PATHS.min_size


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # without importing it (slow, and rarely needed)


def triton_applies(query: torch.Tensor) -> bool:
    """The Triton path runs for backend "triton", and for "auto" on CUDA tensors where triton is installed."""
    if not FAST_PATHS.enabled or FAST_PATHS.backend == "chunked" or query.dtype not in TRITON_DTYPES:
        return False
    if FAST_PATHS.backend == "triton":
        if not triton_installed():
            raise RuntimeError("FAST_PATHS.backend='triton' but triton is not installed: pip install "
                               "'hf-neural-attention[triton]'")
        if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("FAST_PATHS.backend='triton' on CPU tensors needs Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before importing triton")
        return True
    return query.is_cuda and triton_installed()
