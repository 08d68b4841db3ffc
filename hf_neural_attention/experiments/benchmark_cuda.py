"""GPU speed and memory of the variants' fused Triton kernels against SDPA (FlashAttention) and eager attention:
`hfna-benchmark --device cuda [--sizes ...] [--out DIR]` (= python scripts/benchmark.py --device cuda) runs this.

Setting (issue 16's targets): one GPT-2 attention layer (qkv projection, attention, output projection), d_model 1024,
16 heads (d_h 64), batch 1, causal, stock attention dropout 0.1 in training mode, float32 weights under
torch.autocast("cuda", torch.bfloat16), forward + backward from a fixed output gradient; n = 1k..16k.
Methods: sdpa (Transformers' default; FlashAttention under bf16), eager, expressive and neural (the Triton kernels,
FAST_PATHS.backend "auto"), expressive_chunked and neural_chunked (the same variants forced onto the chunked path),
cdape (its chunked path; no fused kernel). Time: CUDA events, median of the timed steps after two warm-up steps.
Memory: torch.cuda.max_memory_allocated during one step, above what was allocated before it.
Targets at n = 8192: expressive within 1.5x of sdpa's time, neural within 3x, both with memory linear in n.
Writes gpu_results.csv and gpu_results.md into --out (default benchmarks/ in the working directory).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

SIZES = (1024, 2048, 4096, 8192, 16384)
METHODS = ("sdpa", "eager", "expressive", "neural", "expressive_chunked", "neural_chunked", "cdape")
D_MODEL, HEADS = 1024, 16
TARGETS = {"expressive": 1.5, "neural": 3.0}  # time / sdpa at n = 8192


def build_step(method: str, n: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.masking_utils import create_causal_mask

    import hf_neural_attention as hfna

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=D_MODEL, n_head=HEADS, n_positions=n, vocab_size=256, bos_token_id=0,
                        eos_token_id=0)  # stock dropout 0.1
    model = GPT2LMHeadModel(config)
    if method in ("sdpa", "eager"):
        model.set_attn_implementation(method)
    else:
        hfna.convert(model, method.removesuffix("_chunked"), layers="all")
    model = model.cuda().train()
    backend = "chunked" if method.endswith("_chunked") else "auto"
    attention = model.transformer.h[0].attn
    generator = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(1, n, D_MODEL, device="cuda", generator=generator).requires_grad_()
    grad = torch.randn(1, n, D_MODEL, device="cuda", generator=generator)
    # no cache, passed by position: Transformers renamed the argument (past_key_values -> cache)
    positions = torch.arange(n, device="cuda")[None]
    mask = create_causal_mask(model.config, hidden.detach(), None, None, position_ids=positions)

    def step():
        with hfna.fast_paths(True, backend=backend), torch.autocast("cuda", dtype=torch.bfloat16):
            output = attention(hidden, attention_mask=mask)[0]
        output.backward(grad.to(output.dtype))
        model.zero_grad(set_to_none=True)
        hidden.grad = None

    return step


def measure(method: str, n: int, steps: int) -> dict:
    import torch

    try:
        step = build_step(method, n)
        step(), step()  # warm-up: Triton compiles, cuDNN picks its kernels
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        memory = (torch.cuda.max_memory_allocated() - before) / 2**20
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return {"method": method, "n": n, "time_s": statistics.median(times), "memory_mib": memory, "error": ""}
    except torch.OutOfMemoryError as error:
        return {"method": method, "n": n, "time_s": None, "memory_mib": None, "error": f"out of memory: {error}"[:200]}
    finally:
        torch.cuda.empty_cache()


def write_results(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gpu_results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import torch

    sdpa = {row["n"]: row["time_s"] for row in rows if row["method"] == "sdpa"}
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; one GPT-2 attention layer, d_model "
             f"{D_MODEL}, {HEADS} heads, batch 1, causal, dropout 0.1, autocast bf16, forward + backward.", "",
             "| method | n | time (ms) | time / sdpa | memory (MiB) |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        if row["time_s"] is None:
            lines.append(f"| {row['method']} | {row['n']} | {row['error']} | | |")
            continue
        ratio = row["time_s"] / sdpa[row["n"]] if sdpa.get(row["n"]) else float("nan")
        lines.append(f"| {row['method']} | {row['n']} | {row['time_s'] * 1000:.2f} | {ratio:.2f} | "
                     f"{row['memory_mib']:.0f} |")
    lines += ["", "Targets at n = 8192 (time / sdpa): " + ", ".join(f"{m} <= {t}x" for m, t in TARGETS.items())]
    for method, target in TARGETS.items():
        measured = next((r for r in rows if r["method"] == method and r["n"] == 8192 and r["time_s"]), None)
        if measured and sdpa.get(8192):
            ratio = measured["time_s"] / sdpa[8192]
            lines.append(f"- {method}: {ratio:.2f}x, target {'met' if ratio <= target else 'missed'}")
    (out / "gpu_results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU; this machine has none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    rows = []
    for n in args.sizes:
        for method in args.methods:
            rows.append(measure(method, n, args.steps))
            print(rows[-1], flush=True)
    write_results(rows, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
