"""The cost model of scripts/check_triton_compile.py: the SASS main-loop parser on a hand-written listing, and
`--cost --quick --json` on the real compiler (sm_90 cubins, no GPU) producing well-formed records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import check_triton_compile as tool  # noqa: E402

LISTING = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   IMAD R1, R0, 0x4, RZ ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0030*/                   FMUL R2, R2, R3 ;
        /*0040*/                   MUFU.EX2 R2, R2 ;
        /*0050*/                   LOP3.LUT R4, R4, 0xff, RZ, 0xc0, !PT ;
        /*0060*/              @!P1 BRA 0x40 ;
        /*0070*/                   SHFL.BFLY PT, R5, R4, 0x1, 0x1f ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/                   LDG.E R6, desc[UR4][R2.64] ;
        /*00a0*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*00b0*/               @P0 BRA 0x20 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0;
"""


def test_the_main_loop_is_the_outermost_backward_branch_counted_by_unit():
    cost = tool.main_loop_cost(LISTING)
    assert cost["instructions"] == 10  # 0x20 .. 0xb0
    assert cost["by_unit"] == {"tensor": 1, "fp32": 1, "int": 2, "special": 1, "memory": 1, "shuffle": 1,
                               "barrier": 1, "other": 2}
    assert cost["inner_loops"] == 1 and cost["other_loops"] == 0  # 0x40 .. 0x60 lies inside; `BRA 0xd0` is no loop


SPLIT = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   FMUL R2, R2, R3 ;
        /*0020*/                   MUFU.EX2 R2, R2 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   ISETP.GE.AND P1, PT, R4, R5, PT ;
        /*0050*/                   FSEL R2, R2, RZ, P1 ;
        /*0060*/                   FMUL R2, R2, R3 ;
        /*0070*/                   MUFU.EX2 R2, R2 ;
        /*0080*/               @P0 BRA 0x40 ;
        /*0090*/                   EXIT ;
"""


def test_a_split_kernel_counts_its_first_loop_and_reports_the_edge_loop_beside_it():
    """The kernels run the tiles that need no mask in a first loop and the diagonal or ragged tiles after it: the
    main loop is the first (here the smaller), the edge loop is reported, not summed."""
    cost = tool.main_loop_cost(SPLIT)
    assert cost["instructions"] == 3 and cost["by_unit"]["special"] == 1 and cost["by_unit"]["int"] == 0
    assert cost["other_loops"] == 1 and cost["edge_instructions"] == 5


def test_the_matrix_varies_one_axis_at_a_time_from_the_base_row():
    full, quick = tool.cost_matrix(False), tool.cost_matrix(True)
    assert [label for label, _ in quick] == ["dot-bf16-causal-p0.1-d64-sm_90", "rational-bf16-causal-p0.1-d64-sm_90",
                                             "neural-bf16-causal-p0.1-d64-sm_90"]
    labels = [label for label, _ in full]
    assert len(labels) == len(set(labels))
    for axis, value in [("arch", 80), ("dtype", "fp16"), ("mask", "padding"), ("dropout", 0.0), ("head_dim", 128)]:
        for variant in ("dot", "rational", "square", "softmax_square", "neural", "neural-add"):
            assert sum(1 for label, spec in full
                       if label.startswith(f"{variant}-{spec['dtype']}-") and spec[axis] == value) == 1


@pytest.mark.slow
def test_cost_json_on_the_quick_subset_is_well_formed(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPTS / "check_triton_compile.py"), "--cost", "--quick", "--json",
                             "--output", str(tmp_path)], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads(result.stdout)
    assert [r["variant"] for r in records] == ["dot", "expressive", "neural"]
    for record in records:
        assert {"config", "variant", "options", "dtype", "mask", "dropout", "head_dim", "arch", "passes",
                "lane_instructions_per_pair"} <= set(record)
        assert (record["arch"], record["dtype"], record["mask"], record["dropout"], record["head_dim"]) == (
            "sm_90", "bf16", "causal", 0.1, 64)
        kernels = [p["kernel"] for p in record["passes"]]
        assert kernels[0] == "forward" and len(kernels) in (2, 3)  # the backward in one pass or two
        for one in record["passes"]:
            assert set(one) >= {"kernel", "registers", "spilled_bytes", "shared_bytes",
                                "loop_lane_instructions_per_pair", "by_unit"}
            assert 0 < one["registers"] <= 255 and one["spilled_bytes"] >= 0 and one["shared_bytes"] > 0
            assert set(one["by_unit"]) == set(tool.UNIT_NAMES) and one["by_unit"]["tensor"] > 0
            assert abs(sum(one["by_unit"].values()) - one["loop_lane_instructions_per_pair"]) < 0.1
            assert one["inner_loops"] == 0  # every loop inside the main loop is unrolled: its count is complete
        total = sum(p["loop_lane_instructions_per_pair"] for p in record["passes"])
        assert record["lane_instructions_per_pair"] == pytest.approx(total, abs=0.1)
    assert records[0]["ratio_to_dot"] == 1.0 and all(r["ratio_to_dot"] > 1.0 for r in records[1:])
    assert (tmp_path / "cost.md").exists()
    # issue 28's targets (sm_90, bf16, causal, dropout 0.1, d_h 64, forward + backward): expressive (rational) at most
    # 125 lane-instructions per pair and 1.3x the dot reference, neural (paper MLP) at most 200 and 2.0x; no spills
    by_variant = {r["variant"]: r for r in records}
    assert by_variant["expressive"]["lane_instructions_per_pair"] <= 125, by_variant["expressive"]
    assert by_variant["expressive"]["ratio_to_dot"] <= 1.3, by_variant["expressive"]
    assert by_variant["neural"]["lane_instructions_per_pair"] <= 200, by_variant["neural"]
    assert by_variant["neural"]["ratio_to_dot"] <= 2.0, by_variant["neural"]
    assert all(p["spilled_bytes"] == 0 for r in records for p in r["passes"])
    # the causal kernels split their tiles: the main loop needs no mask, the diagonal loop beside it does
    assert all(p["other_loops"] == 1 and p["edge_lane_instructions_per_pair"] > 0 for r in records for p in r["passes"])


def test_the_committed_compile_grid_covers_d_h_128_in_bf16_and_fp16_without_spills():
    """results/triton_compile/results.json (scripts/check_triton_compile.py): every kernel (the dot reference, neural
    replace and add, each expressive form) in bf16 and fp16 at d_h 64 and 128, causal and padding with dropout, on
    sm_80 and sm_90, compiled without spilling (issue 23's and 28's target)."""
    grid = [f"{name}-{dtype}-{mask}-dropout-d{head_dim}" for name in tool.GRID_VARIANTS for dtype in ("bf16", "fp16")
            for head_dim in (64, 128) for mask in ("causal", "padding")]
    assert set(grid) <= set(tool.CONFIGS) and len(grid) == 48
    results = json.loads((SCRIPTS.parent / "results" / "triton_compile" / "results.json").read_text())
    compiled = {(r["config"], r["target"]) for r in results["records"]}
    assert {(config, f"sm_{arch}") for config in grid for arch in (80, 90)} <= compiled
    in_target = [r for r in results["records"] if tool.CONFIGS[r["config"]][2] in tool.SPILL_TARGET]
    assert in_target and all(r["spilled"] == 0 for r in in_target), [r for r in in_target if r["spilled"]]
    assert results["target_spills"] == [] and results["failures"] == []
