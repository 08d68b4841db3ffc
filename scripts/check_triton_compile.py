"""Compiles the Triton kernels for real GPUs on a machine without one: every kernel launch the Triton path makes, for
the configurations users train in, goes through Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin with
the ptxas that ships in the triton wheel) for NVIDIA sm_80 (A100) and sm_90 (H100).

The interpreter tests (tests/test_triton_kernels.py) check what the kernels compute; they cannot see what only the
GPU compiler checks: tl.dot's shape and dtype rules, layouts, register pressure and shared memory. This script runs
`triton_attention_output` forward and backward on CPU tensors with the two kernels replaced by a stand-in that
compiles each launch (the same arguments, constexprs, block sizes and warps) instead of running it, and records per
launch the registers per thread, bytes spilled to the stack and the shared memory it needs against the GPU's limit. A failed
compile or a launch that would not fit fails the script (exit 1).

    python scripts/check_triton_compile.py                       # every configuration below, sm_80 and sm_90
    python scripts/check_triton_compile.py --configs neural-bf16-causal-dropout-d64 --targets 90
    python scripts/check_triton_compile.py --sweep     # also: candidate tiles for neural and expressive on sm_90
    python scripts/check_triton_compile.py --cost      # the cost model over COST_MATRIX (--quick: its base row)
    python scripts/check_triton_compile.py --cost --quick --json   # the records as JSON on stdout
The sweep is what triton_attention.GPU_TILES was chosen from: per kernel, the cheapest tiles without spills.
Writes results/triton_compile/results.md (and .json); --cost writes cost.md and cost.json instead. Needs triton;
refuses to run under TRITON_INTERPRET=1.

The cost model (--cost) reads each cubin's disassembly (cuobjdump -sass): the kernel's main loop (the first top-level
loop: the kernels run the tiles that need no mask there, and the causal diagonal and ragged tiles in an edge loop after
it, reported beside it) and its instructions by unit, turned into lane-instructions per (query, key) pair = loop
instructions x 32 lanes x warps / (BLOCK_M x BLOCK_N), summed over the passes of a configuration. Every figure has a
same-run ratio to the dot-product reference (triton_dot_reference.py, FlashAttention-2's algorithm in the same style).
Instruction counts are not time: memory stalls, latency hiding, occupancy, tensor-core throughput and the work
outside the main loop (the edge loop too) are not in them, and a branch inside the loop counts both of its sides.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Per-block shared memory a kernel may use (CUDA's opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# name: (variant, options, dtype, mask, dropout[, head_dim]); masks: causal (computed in the kernel), padding (read),
# none; variant "dot" is the reference kernel of triton_dot_reference.py. The spill target's grid: every kernel (the dot
# reference, each expressive form, neural replace and add) x bf16, fp16 x d_h 64, 128 x causal, padding, with dropout
# 0.1 (the keep pattern and the dropout hash are what raise register pressure); then per-head weights, no dropout and
# float32 (float32 is outside the spill target: its products need twice the registers).
GRID_VARIANTS = {
    "dot": ("dot", {}),
    "neural": ("neural", {}),
    "neural-add": ("neural", {"combine": "add"}),
    "rational": ("expressive", {"form": "rational"}),
    "square": ("expressive", {"form": "square", "scale": True}),
    "softmax_square": ("expressive", {"form": "softmax_square"}),
}
CONFIGS = {
    f"{name}-{dtype}-{mask}-dropout-d{head_dim}": (variant, options, dtype, mask, 0.1, head_dim)
    for name, (variant, options) in GRID_VARIANTS.items() for dtype in ("bf16", "fp16") for head_dim in (64, 128)
    for mask in ("causal", "padding")
} | {
    "neural-add-per-head-bf16-padding": ("neural", {"combine": "add", "per_head": True}, "bf16", "padding", 0.1),
    "neural-fp16-causal": ("neural", {}, "fp16", "causal", 0.0),
    "neural-fp32-none": ("neural", {}, "fp32", "none", 0.0),
    "rational-fp32-none": ("expressive", {"form": "rational"}, "fp32", "none", 0.0),
}
SPILL_TARGET = ("bf16", "fp16")  # dtypes whose configurations must compile without spills
SWEEP_CONFIGS = ("neural-bf16-causal-dropout-d64", "softmax_square-bf16-causal-dropout-d64")
SWEEP_TILES = [(128, 64, 8), (64, 64, 8), (64, 64, 4), (64, 32, 8), (64, 32, 4), (32, 64, 8), (32, 32, 4)]
# The cost model's matrix: a base row (sm_90, bf16, causal, dropout 0.1, d_h 64) per kernel, and from it one axis at
# a time (sm_80, fp16, padding, no dropout, d_h 128); neural per-head weights only at the base (the same code but
# for the weights' offsets).
COST_VARIANTS = {
    "dot": ("dot", {}),
    "rational": ("expressive", {"form": "rational"}),
    "square": ("expressive", {"form": "square", "scale": True}),
    "softmax_square": ("expressive", {"form": "softmax_square"}),
    "neural": ("neural", {}),
    "neural-add": ("neural", {"combine": "add"}),
    "neural-per-head": ("neural", {"per_head": True}),
    "neural-add-per-head": ("neural", {"combine": "add", "per_head": True}),
}
COST_BASE = {"dtype": "bf16", "mask": "causal", "dropout": 0.1, "head_dim": 64, "arch": 90}
COST_AXES = [{"arch": 80}, {"dtype": "fp16"}, {"mask": "padding"}, {"dropout": 0.0}, {"head_dim": 128}]
QUICK_VARIANTS = ("dot", "rational", "neural")
UNITS = {  # SASS opcode (before the first dot) -> unit; unlisted: "int" for I*/U*/V* opcodes, else "other"
    **dict.fromkeys(["HMMA", "HGMMA", "IMMA", "IGMMA", "BMMA", "BGMMA", "DMMA", "QGMMA"], "tensor"),
    **dict.fromkeys(["FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSET", "FSEL", "FCHK", "FRND", "FSWZADD", "F2F",
                     "F2FP", "I2F", "I2FP", "F2I", "F2IP", "HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2", "HSET2",
                     "DADD", "DMUL", "DFMA", "DSETP"], "fp32"),
    **dict.fromkeys(["LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "SEL", "MOV", "PRMT", "P2R", "R2P", "CS2R", "S2R",
                     "S2UR", "R2UR", "SGXT", "POPC", "FLO", "BREV", "BMSK", "PLOP3", "CS2UR"], "int"),
    "MUFU": "special",
    "SHFL": "shuffle",
    **dict.fromkeys(["LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LD", "ST", "LDL", "STL", "ATOM", "ATOMG",
                     "ATOMS", "RED", "REDG", "LDC", "ULDC", "UTMALDG", "UTMASTG", "UBLKCP", "LDGDEPBAR"], "memory"),
    **dict.fromkeys(["BAR", "MEMBAR", "WARPGROUP", "DEPBAR", "FENCE", "SYNCS", "WARPSYNC", "BSSY", "BSYNC", "ERRBAR",
                     "CCTL", "ARRIVES"], "barrier"),
}
UNIT_NAMES = ("tensor", "fp32", "int", "special", "memory", "shuffle", "barrier", "other")
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
              torch.int32: "i32", torch.int64: "i64"}


def type_of(value) -> str:
    """Triton's signature type of a launch argument."""
    if isinstance(value, torch.Tensor):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected launch argument {value!r}")


def cost_matrix(quick: bool) -> list[tuple[str, dict]]:
    """(label, settings) of every configuration the cost model compiles; settings: variant, options, dtype, mask,
    dropout, head_dim, arch."""
    configs = []
    for name, (variant, options) in COST_VARIANTS.items():
        if quick and name not in QUICK_VARIANTS:
            continue
        axes = [{}] if quick or "per-head" in name else [{}, *COST_AXES]
        for change in axes:
            settings = {"variant": variant, "options": options, **COST_BASE, **change}
            label = "-".join([name, settings["dtype"], settings["mask"], f"p{settings['dropout']}",
                              f"d{settings['head_dim']}", f"sm_{settings['arch']}"])
            configs.append((label, settings))
    return configs


def _cuobjdump(compiled, *flags: str) -> str:
    tool = Path(sys.modules["triton"].__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([str(tool), *flags, cubin.name], capture_output=True, text=True, check=True).stdout


INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)(?:\.[A-Z0-9_.]+)?\s*([^;]*);")


def main_loop_cost(sass: str) -> dict:
    """The main loop of one kernel's disassembly and its instruction count by unit. The loops are the backward
    branches (target to branch); the top-level ones are those inside no other. A kernel that splits its tiles (the
    causal diagonal, a ragged last tile) runs the tiles that need no mask in its first loop and the edge tiles after
    it (triton_kernels.py): the main loop is the first top-level loop of at least a quarter of the largest's size;
    the edge loop, the largest of the others, is counted too (`edge_instructions`). Loops inside the main loop
    (`inner_loops`) are counted once; `other_loops` counts the top-level loops beside it."""
    instructions = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(INSTRUCTION.match, sass.splitlines())
                    if m]
    loops = []
    for address, opcode, operands in instructions:
        target = re.match(r"\s*(?:`\()?(?:\.L_x_\d+\)?)?\s*0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    if not loops:
        return {"instructions": 0, "by_unit": {}, "inner_loops": 0, "other_loops": 0, "edge_instructions": 0}
    top = sorted(loop for loop in loops
                 if not any(other != loop and other[0] <= loop[0] and loop[1] <= other[1] for other in loops))

    def size(loop):
        return sum(1 for address, _, _ in instructions if loop[0] <= address <= loop[1])

    largest = max(size(loop) for loop in top)
    start, end = next(loop for loop in top if 4 * size(loop) >= largest)
    others = [loop for loop in top if loop != (start, end)]
    counts = dict.fromkeys(UNIT_NAMES, 0)
    for address, opcode, _ in instructions:
        if start <= address <= end:
            unit = UNITS.get(opcode) or ("int" if opcode[0] in "IUV" else "other")
            counts[unit] += 1
    return {"instructions": sum(counts.values()), "by_unit": counts,
            "inner_loops": sum(1 for loop in loops if loop != (start, end) and start <= loop[0] and loop[1] <= end),
            "other_loops": len(others), "edge_instructions": max((size(loop) for loop in others), default=0)}


class CompileInsteadOfLaunch:
    """Stands in for a jit kernel: `kernel[grid](*args, **kwargs)` compiles for `target` and records the result."""

    def __init__(self, kernel, name: str, target, records: list[dict], label: str, cost: bool = False):
        self.kernel, self.name, self.target, self.records, self.label = kernel, name, target, records, label
        self.cost = cost

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.compile(*args, **kwargs)

    def compile(self, *args, **kwargs):
        import triton
        from triton.compiler import ASTSource

        names = list(inspect.signature(self.kernel.fn).parameters)
        values = dict(zip(names, args)) | {name: value for name, value in kwargs.items() if name in names}
        launch_options = {name: value for name, value in kwargs.items() if name not in names}  # num_warps, ...
        constexprs = {name for name in names if self.kernel.params[names.index(name)].is_constexpr}
        signature = {name: "constexpr" if name in constexprs else type_of(values[name]) for name in names}
        source = ASTSource(fn=self.kernel, signature=signature,
                           constexprs={(names.index(name),): values[name] for name in constexprs})
        started = time.time()
        compiled = triton.compile(source, target=self.target, options=launch_options)
        metadata = compiled.metadata
        n_regs, n_spills = _registers(compiled)
        self.records.append({
            "config": self.label, "kernel": self.name + ("[keys]" if values.get("FOR_KEYS") else
                                                         "[queries]" if "FOR_KEYS" in values else ""),
            "target": f"sm_{self.target.arch}", "num_warps": metadata.num_warps, "num_stages": metadata.num_stages,
            "shared_bytes": metadata.shared, "shared_limit": SHARED_LIMIT[self.target.arch],
            "registers": n_regs, "spilled": n_spills, "seconds": round(time.time() - started, 1),
        })
        if self.cost:
            loop = main_loop_cost(_cuobjdump(compiled, "-sass"))
            per_pair = 32 * metadata.num_warps / (values["BLOCK_M"] * values["BLOCK_N"])
            self.records[-1].update(
                tiles=[values["BLOCK_M"], values["BLOCK_N"], metadata.num_warps], loop_instructions=loop["instructions"],
                inner_loops=loop["inner_loops"], other_loops=loop["other_loops"],
                loop_lane_instructions_per_pair=round(loop["instructions"] * per_pair, 2),
                edge_lane_instructions_per_pair=round(loop["edge_instructions"] * per_pair, 2),
                by_unit={unit: round(count * per_pair, 2) for unit, count in loop["by_unit"].items()})


def _registers(compiled) -> tuple[int | None, int | None]:
    """Registers per thread and the stack frame, read from the cubin's resource usage (cuobjdump ships with triton).
    The kernels declare no local arrays, so a stack frame is spilled registers."""
    listing = _cuobjdump(compiled, "--dump-resource-usage")
    registers = re.search(r"REG:(\d+)", listing)
    spills = re.search(r"STACK:(\d+)", listing)
    return (int(registers.group(1)) if registers else None, int(spills.group(1)) if spills else None)


def run_config(label: str, target, records: list[dict], tiles=None, spec: dict | None = None, cost: bool = False) -> None:
    """Forward and backward of one configuration (CONFIGS[label], or `spec`), each launch compiled for `target`;
    `tiles` (block_m, block_n, num_warps) replaces the GPU tiles of both passes; `cost` adds the main loop's counts."""
    from hf_neural_attention import triton_attention, triton_dot_reference, triton_kernels
    from hf_neural_attention.masks import split_attention_mask
    from hf_neural_attention.registry import build_variant

    if spec is None:
        variant_name, options, dtype_name, mask_kind, dropout, *rest = CONFIGS[label]
        head_dim = rest[0] if rest else 64
    else:
        variant_name, options, dtype_name, mask_kind, dropout, head_dim = (
            spec[key] for key in ("variant", "options", "dtype", "mask", "dropout", "head_dim"))
    batch, heads, length = 2, 4, 256
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype).requires_grad_()
               for _ in range(3))
    if mask_kind == "padding":
        keep = torch.ones(batch, 1, length, length, dtype=torch.bool)
        keep[0, ..., :17] = False  # a left-padded row
        mask = split_attention_mask(keep, length, length, False, q.device)
    else:
        keep = None
        mask = split_attention_mask(None, length, length, mask_kind == "causal", q.device)
    if variant_name == "dot":
        module, names = triton_dot_reference, ("_reference_forward", "_reference_backward")
    else:
        module, names = triton_kernels, ("_forward_kernel", "_backward_kernel")
    chosen_tiles = triton_attention._tiles
    if tiles is not None:  # both passes of every kernel
        triton_attention._tiles = lambda *args: (triton_attention.Tiles(*tiles), triton_attention.Tiles(*tiles))
    originals = [getattr(module, name) for name in names]
    arch = triton_attention._arch
    triton_attention._arch = lambda device: target.arch  # the tiles a GPU of this generation would get
    for name, kernel, kind in zip(names, originals, ("forward", "backward")):
        setattr(module, name, CompileInsteadOfLaunch(kernel, kind, target, records, label, cost))
    try:
        if variant_name == "dot":
            seed = torch.tensor(12345, dtype=torch.int64)
            output = triton_dot_reference.dot_reference_attention(
                q, k, v, keep, mask_kind == "causal", head_dim**-0.5, dropout, seed)
        else:
            variant = build_variant(variant_name, heads, head_dim, **options).to(dtype)
            inputs = variant.kernel_inputs(q, k, mask, head_dim**-0.5)
            assert not isinstance(inputs, str), f"{label}: {inputs}"
            seed = torch.tensor(12345) if dropout > 0.0 else None
            output = triton_attention.triton_attention_output(inputs, v, mask, dropout, seed)
        assert isinstance(output, torch.Tensor), f"{label}: the Triton path does not cover this configuration: {output}"
        output.float().sum().backward()
    finally:
        for name, kernel in zip(names, originals):
            setattr(module, name, kernel)
        triton_attention._arch = arch
        triton_attention._tiles = chosen_tiles


def cost_records(configs: list[tuple[str, dict]], failures: list[str]) -> list[dict]:
    """One record per configuration: its passes' registers, spills, shared memory and main-loop counts, the sum over
    passes, and the ratio to the dot reference with the same settings (when that was compiled in the same run)."""
    from triton.backends.compiler import GPUTarget

    records = []
    for label, spec in configs:
        compiled: list[dict] = []
        try:
            run_config(label, GPUTarget("cuda", spec["arch"], 32), compiled, spec=spec, cost=True)
        except Exception as error:
            failures.append(f"{label}: {type(error).__name__}: {error}")
            continue
        passes = [{"kernel": r["kernel"], "registers": r["registers"], "spilled_bytes": r["spilled"],
                   "shared_bytes": r["shared_bytes"], "tiles": r["tiles"], "loop_instructions": r["loop_instructions"],
                   "inner_loops": r["inner_loops"], "other_loops": r["other_loops"],
                   "loop_lane_instructions_per_pair": r["loop_lane_instructions_per_pair"],
                   "edge_lane_instructions_per_pair": r["edge_lane_instructions_per_pair"], "by_unit": r["by_unit"]}
                  for r in compiled]
        records.append({
            "config": label, "variant": spec["variant"], "options": spec["options"], "dtype": spec["dtype"],
            "mask": spec["mask"], "dropout": spec["dropout"], "head_dim": spec["head_dim"], "arch": f"sm_{spec['arch']}",
            "passes": passes,
            "lane_instructions_per_pair": round(sum(p["loop_lane_instructions_per_pair"] for p in passes), 1)})
    keys = ("dtype", "mask", "dropout", "head_dim", "arch")
    references = {tuple(r[key] for key in keys): r["lane_instructions_per_pair"] for r in records if r["variant"] == "dot"}
    for record in records:
        reference = references.get(tuple(record[key] for key in keys))
        record["ratio_to_dot"] = round(record["lane_instructions_per_pair"] / reference, 2) if reference else None
    return records


def cost_table(records: list[dict]) -> list[str]:
    header = ("| configuration | passes: lane-instr./pair (registers, spilled B) | total | x dot | "
              + " | ".join(UNIT_NAMES) + " |")
    rows = [header, "|---|---|---:|---:|" + "---:|" * len(UNIT_NAMES)]
    for r in records:
        units = {unit: sum(p["by_unit"].get(unit, 0) for p in r["passes"]) for unit in UNIT_NAMES}
        passes = "; ".join(f"{p['kernel']} {p['loop_lane_instructions_per_pair']:.0f} ({p['registers']}, "
                           f"{p['spilled_bytes']})" + (f" [{p['inner_loops']} inner loops]" if p["inner_loops"] else "")
                           for p in r["passes"])
        rows.append(f"| {r['config']} | {passes} | {r['lane_instructions_per_pair']:.0f} | "
                    f"{r['ratio_to_dot'] if r['ratio_to_dot'] is not None else '-'} | "
                    + " | ".join(f"{units[unit]:.0f}" for unit in UNIT_NAMES) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--targets", nargs="+", type=int, default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--sweep", action="store_true", help="also compile candidate tiles (sm_90)")
    parser.add_argument("--cost", action="store_true", help="the cost model over COST_MATRIX instead")
    parser.add_argument("--quick", action="store_true", help="with --cost: only the base row of dot, rational, neural")
    parser.add_argument("--json", action="store_true", help="with --cost: print the records as JSON")
    parser.add_argument("--match", default=None,
                        help="only the configurations whose name matches this regular expression (both modes)")
    parser.add_argument("--output", default=str(REPO / "results" / "triton_compile"))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the interpreter does not compile; unset it")
    from triton.backends.compiler import GPUTarget

    if args.cost:
        return run_cost(args)

    records: list[dict] = []
    failures: list[str] = []
    for arch in args.targets:
        for label in args.configs:
            if args.match and not re.search(args.match, label):
                continue
            try:
                run_config(label, GPUTarget("cuda", arch, 32), records)
            except Exception as error:  # reported with the configuration, then the script fails
                failures.append(f"{label} on sm_{arch}: {type(error).__name__}: {error}")
    swept: list[dict] = []
    for label in SWEEP_CONFIGS if args.sweep else ():
        for tiles in SWEEP_TILES:
            found: list[dict] = []
            try:
                run_config(label, GPUTarget("cuda", 90, 32), found, tiles)
            except Exception as error:
                failures.append(f"{label} with tiles {tiles}: {type(error).__name__}: {error}")
            swept += [{**record, "tiles": list(tiles)} for record in found]
    too_big = [f"{r['config']} {r['kernel']} on {r['target']}: {r['shared_bytes']} B shared > {r['shared_limit']}"
               for r in records if r["shared_bytes"] > r["shared_limit"]]
    target_spills = [r for r in records if CONFIGS[r["config"]][2] in SPILL_TARGET and r["spilled"]]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps({"records": records, "sweep": swept, "failures": failures + too_big,
                                                         "target_spills": [f"{r['config']} {r['kernel']} {r['target']}"
                                                                           for r in target_spills]}, indent=1))
    header = "| configuration | kernel | target | warps | stages | registers/thread | spilled to stack (bytes) | shared (KiB) |"
    rows = [f"| {r['config']} | {r['kernel']} | {r['target']} | {r['num_warps']} | {r['num_stages']} | "
            f"{r['registers']} | {r['spilled']} | {r['shared_bytes'] / 1024:.1f} of {r['shared_limit'] // 1024} |"
            for r in records]
    import triton

    (output / "results.md").write_text("\n".join([
        "# Triton kernels compiled for NVIDIA GPUs (no GPU needed)", "",
        f"triton {triton.__version__}, torch {torch.__version__}; B 2, H 4, L 256, d_h as named (64 where not), the tiles of "
        "triton_attention.gpu_tiles (GPU_TILES with TILE_OVERRIDES: the launches a GPU run makes). registers/thread and the stack frame from the "
        "cubin (cuobjdump); the kernels have no local arrays, so a stack frame is spilled registers. Command: "
        "`python scripts/check_triton_compile.py" + (" --sweep" if swept else "") + "`.", "",
        header, "|---|---|---|---:|---:|---:|---:|---:|", *rows, "",
        *(["## Candidate tiles (sm_90, the same tiles in forward and backward)", "",
            "| configuration | BLOCK_M x BLOCK_N, warps | kernel | registers/thread | spilled to stack (bytes) | shared (KiB) |",
            "|---|---|---|---:|---:|---:|",
            *[f"| {r['config']} | {r['tiles'][0]} x {r['tiles'][1]}, {r['tiles'][2]} | {r['kernel']} | "
              f"{r['registers']} | {r['spilled']} | {r['shared_bytes'] / 1024:.1f} |" for r in swept], ""]
          if swept else []),
        "Spills in the target (" + ", ".join(SPILL_TARGET) + "): " + ("; ".join(
            f"{r['config']} {r['kernel']} {r['target']} {r['spilled']} B" for r in target_spills) or "none") + ".",
        "", "Failures: " + ("; ".join(failures + too_big) if failures or too_big else "none."), ""]))
    print((output / "results.md").read_text())
    return 1 if failures or too_big else 0


def run_cost(args) -> int:
    import triton

    failures: list[str] = []
    started = time.time()
    configs = [(label, spec) for label, spec in cost_matrix(args.quick) if not args.match or re.search(args.match, label)]
    records = cost_records(configs, failures)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "cost.json").write_text(json.dumps({"records": records, "failures": failures}, indent=1))
    (output / "cost.md").write_text("\n".join([
        "# Cost model: the kernels' main loops from their sm_80 / sm_90 disassembly", "",
        f"triton {triton.__version__}, torch {torch.__version__}; B 2, H 4, L 256, the GPU tiles; "
        f"{len(records)} configurations in {time.time() - started:.0f} s. Command: "
        "`python scripts/check_triton_compile.py --cost" + (" --quick" if args.quick else "") + "`.", "",
        "Per pass: the main loop's instructions x 32 lanes x warps / (BLOCK_M x BLOCK_N), i.e. lane-instructions "
        "per (query, key) pair, then registers per thread and bytes spilled; total: summed over the passes; x dot: "
        "its ratio to the dot-product reference (triton_dot_reference.py, FlashAttention-2's algorithm) with the same "
        "settings; the unit columns split the total (lane-instructions per pair). The main loop is the first top-level "
        "loop, over the tiles that need no mask; a causal kernel's diagonal tiles (and a ragged last tile) run in an "
        "edge loop after it, in cost.json as edge_lane_instructions_per_pair and not in the totals (at n = 8192 about "
        "2-3% of a causal pass's tiles). Instruction counts are not time.",
        "", *cost_table(records), "",
        "Failures: " + ("; ".join(failures) if failures else "none."), ""]))
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print((output / "cost.md").read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
