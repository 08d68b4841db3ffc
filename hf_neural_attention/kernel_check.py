"""A self-check of the fused kernels where they actually run. No bf16 product of these kernels had executed on a
GPU when they were written, so the first call on a device for each kernel case (variant rule and options, dtype,
head size) compares the kernels with the chunked engine on a tiny random input, forward and backward (milliseconds
on a GPU). On a mismatch it warns once and the chunked engine computes that case for the rest of the process.

`FAST_PATHS.kernel_self_check`: "cuda" (default: on CUDA tensors), "always" (also under Triton's interpreter, for
tests) or "never". `hfna-selftest` runs the full comparison and a speed run and prints a report.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .chunked import variant_chunked_attention
from .kernel_inputs import ExpressiveKernelInputs, KernelInputs
from .masks import KeyMask
from .runtime import current_settings, replaying_settings
from .variant import AttentionVariant

logger = logging.getLogger(__name__)

# max |kernel - chunked| over max |chunked| (see max_relative_error), for outputs and gradients. A broken kernel is
# off by order 1; agreeing kernels differ by summation order (float32: ~1e-5 of the largest gradient in a gradient
# that is 0 in exact arithmetic) and, in half precision, by the rounding of the output and the gradients.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
_VERDICTS: dict[tuple, str | None] = {}


def case_of(inputs: KernelInputs, value: torch.Tensor) -> tuple:
    """What makes one compiled kernel differ from another: the rule and its options, dtype, head size, device."""
    if isinstance(inputs, ExpressiveKernelInputs):
        rule = ("expressive", inputs.form, inputs.dot_scale != 1.0)
    else:
        rule = ("neural", inputs.activation, inputs.add_dot, inputs.hidden_weight.shape[0] > 1)
    return (str(value.device), *rule, value.dtype, value.shape[-1])


def self_check_applies(value: torch.Tensor) -> bool:
    mode = current_settings().kernel_self_check
    return mode == "always" or (mode == "cuda" and value.is_cuda)


def max_relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest |got - expected| of each tensor over its largest |expected|, that scale floored at 1 % of the largest
    magnitude of all the tensors: a gradient that is zero in exact arithmetic (neural's last bias, added to every
    logit of a row) holds only rounding noise, which is no relative error."""
    magnitudes = [float(e.detach().float().abs().max()) if e.numel() else 0.0 for e in expected]
    floor = max(1e-2 * max(magnitudes), 1e-12)
    return max(float((g.detach().float() - e.detach().float()).abs().max()) / max(m, floor)
               for g, e, m in zip(got, expected, magnitudes) if e.numel())


def compare_with_chunked(variant: AttentionVariant, run_kernels: Callable, dtype: torch.dtype, device: torch.device,
                         heads: int, head_dim: int, length: int = 40, mask: KeyMask | None = None,
                         scaling: float | None = None) -> float:
    """Largest relative error of the kernels' output and q, k, v gradients against the chunked engine's, on random
    inputs [1, heads, length, head_dim] (causal unless a mask is given). run_kernels(inputs, value, mask) -> output."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator, device=device).to(dtype) for _ in range(3))
    mask = KeyMask.causal_pattern(length, length, device) if mask is None else mask
    scaling = head_dim**-0.5 if scaling is None else scaling
    upstream = torch.randn(1, heads, length, head_dim, generator=generator, device=device).to(dtype)
    results = []
    for engine in ("kernels", "chunked"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            if engine == "kernels":
                output = run_kernels(variant.kernel_inputs(leaves[0], leaves[1], mask, scaling), leaves[2], mask)
            else:
                output = variant_chunked_attention(variant, *leaves, mask, scaling)
            grads = torch.autograd.grad(output, leaves, upstream, allow_unused=True)
        results.append([output, *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))])
    return max_relative_error(*results)


def kernels_trusted(variant: AttentionVariant, inputs: KernelInputs, value: torch.Tensor,
                    run_kernels: Callable) -> str | None:
    """None where the kernels passed this case's check (run once per case and process), else why not."""
    case = case_of(inputs, value)
    if case not in _VERDICTS:
        with replaying_settings(current_settings()):  # the check's own calls run as the caller's
            error = compare_with_chunked(variant, run_kernels, value.dtype, value.device, value.shape[1],
                                         value.shape[-1])
        tolerance = TOLERANCE.get(value.dtype, 1e-4)
        _VERDICTS[case] = None if error <= tolerance else (
            f"the kernels' self-check failed for {case} (relative error {error:.2e} > {tolerance:.0e} against the "
            "chunked engine); this case runs the chunked engine. Please report it with the output of hfna-selftest")
        if _VERDICTS[case] is not None:
            logger.warning("hf_neural_attention: %s", _VERDICTS[case])
    return _VERDICTS[case]
