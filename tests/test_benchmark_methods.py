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


@pytest.mark.parametrize("method", benchmark.LLAMA_TRAIN_METHODS)
def test_the_llama_family_model_runs_a_step_with_its_method(method):
    step, model = benchmark_worker.build(method, "model", n=32, dropout="0", arch="llama")
    calls = []
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    step()
    handle.remove()
    assert calls == [1]
    expected = method if method in ("sdpa", "eager") else benchmark_worker.VARIANT_OF[method][0]
    assert model.config._attn_implementation == expected
    with pytest.raises(ValueError, match="level 'model' only"):
        benchmark_worker.build(method, "layer", n=32, dropout="0", arch="llama")


def test_llama_rows_are_planned_at_level_model_without_dropout_and_get_their_own_table():
    args = benchmark.argparse.Namespace(dtypes=["fp32"], dropouts=["stock"], levels=["layer", "model"], sizes=[64],
                                        methods=["sdpa", "eager", "neural", "neural_plain"], archs=["gpt2", "llama"],
                                        decode_sizes=[], batches=[])
    llama = [job for job in benchmark.planned_jobs(args) if job[-1] == "llama"]
    assert llama == [((("fp32", "0")), "model", method, 64, 1, "llama") for method in ("sdpa", "eager", "neural")]
    rows = [{"dtype": "fp32", "dropout": "0", "level": "model", "arch": "llama", "method": method, "n": 64,
             "time_s": time, "peak_mib": 10.0} for method, time in (("sdpa", 1.0), ("eager", 2.0), ("neural", 3.0))]
    benchmark.add_ratios(rows)
    table = [line for line in benchmark.llama_section(rows) if line.startswith("| fp32")]
    assert [line.split(" | ")[1] for line in table] == ["sdpa", "eager", "neural"]
    assert "| 1.50 | 1.00 | 3.00 | 1.00 | **MISS** (time) |" in table[2]
