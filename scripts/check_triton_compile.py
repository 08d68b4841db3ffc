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
    python scripts/check_triton_compile.py --configs neural-bf16-causal-dropout --targets 90
    python scripts/check_triton_compile.py --sweep     # also: candidate tiles for neural and expressive on sm_90
The sweep is what triton_attention.GPU_TILES was chosen from: per score, the largest tiles without spills.
Writes results/triton_compile/results.md (and .json). Needs triton; refuses to run under TRITON_INTERPRET=1.
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
# name: (variant, options, dtype, mask, dropout); masks: causal (computed in the kernel), padding (read), none
CONFIGS = {
    "neural-bf16-causal-dropout": ("neural", {}, "bf16", "causal", 0.1),
    "neural-add-per-head-bf16-padding": ("neural", {"combine": "add", "per_head": True}, "bf16", "padding", 0.1),
    "neural-fp16-causal": ("neural", {}, "fp16", "causal", 0.0),
    "neural-fp32-none": ("neural", {}, "fp32", "none", 0.0),
    "rational-bf16-causal-dropout": ("expressive", {"form": "rational"}, "bf16", "causal", 0.1),
    "square-bf16-padding": ("expressive", {"form": "square", "scale": True}, "bf16", "padding", 0.0),
    "softmax_square-bf16-causal-dropout": ("expressive", {"form": "softmax_square"}, "bf16", "causal", 0.1),
    "softmax_square-fp16-padding-dropout": ("expressive", {"form": "softmax_square"}, "fp16", "padding", 0.1),
    "rational-fp32-none": ("expressive", {"form": "rational"}, "fp32", "none", 0.0),
}
SWEEP_CONFIGS = ("neural-bf16-causal-dropout", "softmax_square-bf16-causal-dropout")
SWEEP_TILES = [(128, 64, 8), (64, 64, 8), (64, 64, 4), (64, 32, 8), (64, 32, 4), (32, 64, 8), (32, 32, 4)]
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


class CompileInsteadOfLaunch:
    """Stands in for a jit kernel: `kernel[grid](*args, **kwargs)` compiles for `target` and records the result."""

    def __init__(self, kernel, name: str, target, records: list[dict], label: str):
        self.kernel, self.name, self.target, self.records, self.label = kernel, name, target, records, label

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


def _registers(compiled) -> tuple[int | None, int | None]:
    """Registers per thread and the stack frame, read from the cubin's resource usage (cuobjdump ships with triton).
    The kernels declare no local arrays, so a stack frame is spilled registers."""
    tool = Path(sys.modules["triton"].__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        listing = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    registers = re.search(r"REG:(\d+)", listing.stdout)
    spills = re.search(r"STACK:(\d+)", listing.stdout)
    return (int(registers.group(1)) if registers else None, int(spills.group(1)) if spills else None)


def run_config(label: str, target, records: list[dict], tiles=None) -> None:
    """Forward and backward of one configuration, each launch compiled for `target`; `tiles` (block_m, block_n,
    num_warps) replaces the GPU tiles of both passes."""
    from hf_neural_attention import triton_attention, triton_kernels
    from hf_neural_attention.masks import split_attention_mask
    from hf_neural_attention.registry import build_variant

    variant_name, options, dtype_name, mask_kind, dropout = CONFIGS[label]
    batch, heads, length, head_dim = 2, 4, 256, 64
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype).requires_grad_()
               for _ in range(3))
    variant = build_variant(variant_name, heads, head_dim, **options).to(dtype)
    if mask_kind == "padding":
        keep = torch.ones(batch, 1, length, length, dtype=torch.bool)
        keep[0, ..., :17] = False  # a left-padded row
        mask = split_attention_mask(keep, length, length, False, q.device)
    else:
        mask = split_attention_mask(None, length, length, mask_kind == "causal", q.device)
    originals = triton_kernels._forward_kernel, triton_kernels._backward_kernel
    chosen = dict(triton_attention.GPU_TILES)
    if tiles is not None:
        score = triton_kernels.SCORE_NEURAL if variant_name == "neural" else triton_kernels.EXPRESSIVE_SCORES[
            options["form"]]
        triton_attention.GPU_TILES[score] = (triton_attention.Tiles(*tiles), triton_attention.Tiles(*tiles))
    triton_kernels._forward_kernel = CompileInsteadOfLaunch(originals[0], "forward", target, records, label)
    triton_kernels._backward_kernel = CompileInsteadOfLaunch(originals[1], "backward", target, records, label)
    try:
        inputs = variant.kernel_inputs(q, k, mask, head_dim**-0.5)
        assert not isinstance(inputs, str), f"{label}: {inputs}"
        seed = torch.tensor(12345) if dropout > 0.0 else None
        output = triton_attention.triton_attention_output(inputs, v, mask, dropout, seed)
        assert isinstance(output, torch.Tensor), f"{label}: the Triton path does not cover this configuration: {output}"
        output.float().sum().backward()
    finally:
        triton_kernels._forward_kernel, triton_kernels._backward_kernel = originals
        triton_attention.GPU_TILES.update(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--targets", nargs="+", type=int, default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--sweep", action="store_true", help="also compile candidate tiles (sm_90)")
    parser.add_argument("--output", default=str(REPO / "results" / "triton_compile"))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the interpreter does not compile; unset it")
    from triton.backends.compiler import GPUTarget

    records: list[dict] = []
    failures: list[str] = []
    for arch in args.targets:
        for label in args.configs:
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
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps({"records": records, "sweep": swept, "failures": failures + too_big}, indent=1))
    header = "| configuration | kernel | target | warps | stages | registers/thread | spilled to stack (bytes) | shared (KiB) |"
    rows = [f"| {r['config']} | {r['kernel']} | {r['target']} | {r['num_warps']} | {r['num_stages']} | "
            f"{r['registers']} | {r['spilled']} | {r['shared_bytes'] / 1024:.1f} of {r['shared_limit'] // 1024} |"
            for r in records]
    import triton

    (output / "results.md").write_text("\n".join([
        "# Triton kernels compiled for NVIDIA GPUs (no GPU needed)", "",
        f"triton {triton.__version__}, torch {torch.__version__}; B 2, H 4, L 256, d_h 64, the tiles of "
        "triton_attention.GPU_TILES (the launches a GPU run makes). registers/thread and the stack frame from the "
        "cubin (cuobjdump); the kernels have no local arrays, so a stack frame is spilled registers. Command: "
        "`python scripts/check_triton_compile.py" + (" --sweep" if swept else "") + "`.", "",
        header, "|---|---|---|---:|---:|---:|---:|---:|", *rows, "",
        *(["## Candidate tiles (sm_90, the same tiles in forward and backward)", "",
            "| configuration | BLOCK_M x BLOCK_N, warps | kernel | registers/thread | spilled to stack (bytes) | shared (KiB) |",
            "|---|---|---|---:|---:|---:|",
            *[f"| {r['config']} | {r['tiles'][0]} x {r['tiles'][1]}, {r['tiles'][2]} | {r['kernel']} | "
              f"{r['registers']} | {r['spilled']} | {r['shared_bytes'] / 1024:.1f} |" for r in swept], ""]
          if swept else []),
        "Failures: " + ("; ".join(failures + too_big) if failures or too_big else "none."), ""]))
    print((output / "results.md").read_text())
    return 1 if failures or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
