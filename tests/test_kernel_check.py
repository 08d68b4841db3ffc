"""The kernels' self-check (kernel_check.py) and hfna-selftest, under Triton's interpreter: a wrong kernel is caught
on its first call, said once, and its case runs the chunked engine; a right one keeps running."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_neural_attention import dispatch, kernel_check, triton_attention
from hf_neural_attention.commands import selftest
from hf_neural_attention.masks import split_attention_mask
from hf_neural_attention.registry import build_variant
from hf_neural_attention.runtime import FAST_PATHS, fast_paths

pytestmark = pytest.mark.triton
H, D = 2, 32


@pytest.fixture(autouse=True)
def self_check_everywhere(monkeypatch):
    monkeypatch.setattr(FAST_PATHS, "kernel_self_check", "always")
    monkeypatch.setattr(kernel_check, "_VERDICTS", {})


def attend(variant, backend):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, 33, D, generator=generator) for _ in range(3))
    mask = split_attention_mask(None, 33, 33, True, q.device)
    with fast_paths(True, min_size=0, backend=backend):
        return dispatch.attention(variant, q, k, v, mask, D**-0.5, 0.0)[0]


def test_a_wrong_kernel_is_caught_said_once_and_replaced_by_the_chunked_engine(monkeypatch, caplog):
    calls = []
    original = triton_attention.fused_attention
    monkeypatch.setattr(triton_attention, "fused_attention",
                        lambda *args: calls.append(1) or original(*args) * 1.05)  # 5 % off
    variant = build_variant("expressive", H, D)
    with caplog.at_level(logging.WARNING):
        first, second = attend(variant, "triton"), attend(variant, "triton")
    chunked = attend(variant, "chunked")
    torch.testing.assert_close(first, chunked, rtol=0, atol=0)
    torch.testing.assert_close(second, chunked, rtol=0, atol=0)
    assert len(calls) == 1, "only the check ran the kernels; the verdict is kept"
    said = [r.getMessage() for r in caplog.records if "self-check failed" in r.getMessage()]
    assert len(said) == 1 and "expressive" in said[0] and "hfna-selftest" in said[0]


def test_a_right_kernel_passes_the_check_and_keeps_running(monkeypatch):
    calls = []
    original = triton_attention.fused_attention
    monkeypatch.setattr(triton_attention, "fused_attention", lambda *args: calls.append(1) or original(*args))
    variant = build_variant("expressive", H, D)
    output = attend(variant, "triton")
    assert len(calls) == 2  # the check, then the call itself
    assert list(kernel_check._VERDICTS.values()) == [None]
    torch.testing.assert_close(output, attend(variant, "chunked"), rtol=0, atol=1e-5)
    attend(variant, "triton")
    assert len(calls) == 3, "the check runs once per case"


@pytest.mark.slow
def test_selftest_reports_every_quick_case(capsys, monkeypatch):
    monkeypatch.setattr(FAST_PATHS, "kernel_self_check", "never")  # compare the kernels themselves
    assert selftest.main(["--device", "cpu", "--quick"]) == 0
    report = capsys.readouterr().out
    rows = [line for line in report.splitlines() if line.startswith("| expressive") or line.startswith("| neural")]
    assert len(rows) == sum(1 for _ in selftest._cases(True)) and all(row.endswith("| yes |") for row in rows)
    assert "0 of" in report
