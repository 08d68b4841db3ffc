"""Every method and level of the CPU benchmark (hfna-benchmark) builds and runs a step, so a change to the package
cannot leave one of its configurations broken until the next full run (the `*_reference` methods once were: a
converted model refused to switch its implementation to the reference function)."""

from __future__ import annotations

import pytest
import torch

from hf_neural_attention.experiments import benchmark, benchmark_worker


@pytest.mark.parametrize("method", benchmark.METHODS)
@pytest.mark.parametrize("level", ["layer", "model", "inference"])
def test_every_benchmark_method_runs_a_step(method, level):
    step, model = benchmark_worker.build(method, level, n=32, dropout="stock")
    calls = []
    attention = model.transformer.h[0].attn
    handle = attention.register_forward_hook(lambda module, args, output: calls.append(output[0].shape))
    step()
    handle.remove()
    assert calls == [torch.Size([1, 32, benchmark_worker.D_MODEL])]
    if method in ("sdpa", "eager") or method.endswith("_reference"):
        expected = method
    else:
        expected = benchmark_worker.VARIANT_OF[method][0]
    assert model.config._attn_implementation == expected
