"""Runtime switches of the fast paths, never saved with a model.

`FAST_PATHS` holds the process-wide defaults; `fast_paths(...)` overrides some of them for the current thread or
asyncio task only (a `contextvars` context) and, on exit, restores exactly the fields it changed. So two threads
with their own `fast_paths` blocks never see each other's settings, and a block leaves the process as it found it.
What a setting changes is speed and memory, never the numbers: every path draws the same dropout mask
(dropout_mask.py) and computes the same rule. A forward that autograd recomputes during backward (activation
checkpointing) runs under the settings of its first run, whatever is in effect during backward (dispatch.py), so
the recompute saves what the first run saved. Measurements behind the defaults: benchmarks/results.md.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

BACKENDS = ("auto", "triton", "chunked")
SELF_CHECKS = ("cuda", "always", "never")


@dataclass
class FastPathSettings:
    """enabled: use a variant's fast path where it applies (attention weights not requested, at least `min_size`
        query-key pairs).
    chunk_size: query rows per chunk; None picks it from `chunk_elements`.
    chunk_elements: target size (elements) of one chunk's [B, H, rows, Lk] score block when chunk_size is None
        (CPU tensors; on a GPU a chunk is `gpu_chunk_elements`).
    gpu_chunk_elements: the same target on CUDA tensors, where small chunks leave the device idle.
    min_rows: the fewest rows of an automatic chunk (matrix products on fewer rows run slowly).
    min_size: smallest Lq * Lk that takes the fast path; smaller maps run the plain path (the crossover measured on
        a 2-core CPU lies between n = 256 and 512).
    flex_inference: run the variants that state a FlexAttention score_mod (dot, expressive) through compiled
        FlexAttention when no gradient is needed (forward only; compiled on first use, and again for new shapes).
    backend: "auto" (the fused Triton kernels on CUDA tensors where triton is installed, else the chunked engine),
        "triton" (force the kernels; on CPU tensors only under TRITON_INTERPRET=1, as the tests run them) or
        "chunked" (never the kernels). See triton_attention.py.
    kernel_self_check: compare the kernels with the chunked engine on the first call of each kernel case: "cuda"
        (on CUDA tensors), "always" (also under the interpreter) or "never". See kernel_check.py.
    """

    enabled: bool = True
    chunk_size: int | None = None
    chunk_elements: int = 1 << 20
    gpu_chunk_elements: int = 1 << 26
    min_rows: int = 64
    min_size: int = 1 << 17
    flex_inference: bool = False
    backend: str = "auto"
    kernel_self_check: str = "cuda"

    def __setattr__(self, name: str, value: Any) -> None:
        choices = {"backend": BACKENDS, "kernel_self_check": SELF_CHECKS}.get(name)
        if choices is not None and value not in choices:
            raise ValueError(f"FAST_PATHS.{name}={value!r} is not valid; choose one of {list(choices)}")
        super().__setattr__(name, value)


FAST_PATHS = FastPathSettings()
_FIELDS = tuple(field.name for field in dataclasses.fields(FastPathSettings))
_OVERRIDES: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("hfna_fast_path_overrides", default={})


def current_settings() -> FastPathSettings:
    """The settings in effect here: this context's `fast_paths` overrides over the process-wide FAST_PATHS. Under
    torch.compile they are read once, when the graph is traced (Dynamo cannot trace a ContextVar)."""
    if not torch.compiler.is_compiling() and not _OVERRIDES.get():
        return FAST_PATHS
    return FastPathSettings(*_setting_values())


@torch.compiler.assume_constant_result
def _setting_values() -> tuple:
    """Every field's value here, in field order: this context's override, else the process-wide one."""
    overrides = _OVERRIDES.get()
    return tuple(overrides.get(name, getattr(FAST_PATHS, name)) for name in _FIELDS)


class replaying_settings:  # noqa: N801
    """Runs a block under exactly `settings` (every field), in this context only: how the dispatcher re-uses a
    forward's settings when autograd recomputes that forward during backward (activation checkpointing)."""

    def __init__(self, settings: FastPathSettings) -> None:
        self.settings = settings

    def __enter__(self) -> None:
        # nothing to set when these are the settings in effect already (inference, and every call without overrides)
        self.token = None
        if self.settings is not current_settings() and not torch.compiler.is_compiling():
            self.token = _OVERRIDES.set({name: getattr(self.settings, name) for name in _FIELDS})

    def __exit__(self, *exc_info) -> None:
        if self.token is not None:
            _OVERRIDES.reset(self.token)


class fast_paths:  # noqa: N801 (used like a function: `with fast_paths(False): ...`)
    """`with fast_paths(False): ...` runs the plain paths; `fast_paths(True, min_size=0, chunk_size=4)` forces the
    chunked paths even on tiny inputs (what the tests do). Settings not given keep their values. The block affects
    only the current thread / task, and on exit restores the fields it set, nothing else."""

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
        self.tokens: list[contextvars.Token] = []

    def __enter__(self) -> FastPathSettings:
        self.tokens.append(_OVERRIDES.set({**_OVERRIDES.get(), **self.changes}))
        return current_settings()

    def __exit__(self, *exc_info) -> None:
        _OVERRIDES.reset(self.tokens.pop())


FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def fast_path_skip_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          settings: FastPathSettings) -> str | None:
    """Why the chunked fast path may not run on these inputs under these settings, or None where it may: it must be
    enabled, query, key and value in one dtype of FAST_DTYPES, and the map at least min_size pairs (smaller maps run
    faster plain)."""
    if not settings.enabled:
        return "fast paths are disabled (fast_paths(False))"
    if query.shape[2] * key.shape[2] < settings.min_size:  # first: a small map runs plain whatever its dtypes
        return "small map"
    if query.dtype not in FAST_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return (f"query, key and value must share one dtype of {[str(d) for d in FAST_DTYPES]}; got "
                f"{query.dtype}, {key.dtype}, {value.dtype}")
    return None


def flex_applies(query: torch.Tensor, key: torch.Tensor, settings: FastPathSettings) -> bool:
    return settings.enabled and settings.flex_inference and query.shape[2] * key.shape[2] >= settings.min_size


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_found() -> bool:
    return importlib.util.find_spec("triton") is not None  # without importing it (slow, and rarely needed)


@torch.compiler.assume_constant_result  # a constant to Dynamo, which would trace into the cache and warn
def triton_installed() -> bool:
    return _triton_found()


def triton_applies(query: torch.Tensor, settings: FastPathSettings) -> bool:
    """The Triton path runs for backend "triton", and for "auto" on CUDA tensors where triton is installed."""
    if not settings.enabled or settings.backend == "chunked":
        return False
    if settings.backend == "auto":
        return query.is_cuda and query.dtype in TRITON_DTYPES and triton_installed()
    if query.dtype not in TRITON_DTYPES:  # backend "triton" from here on
        return False
    if not triton_installed():
        raise RuntimeError("FAST_PATHS.backend='triton' but triton is not installed: pip install "
                           "'hf-neural-attention[triton]'")
    if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("FAST_PATHS.backend='triton' on CPU tensors needs Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing triton")
    return True
