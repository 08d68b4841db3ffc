"""One benchmark configuration, measured in its own process: `benchmark.py` starts
`python -m hf_neural_attention.experiments.benchmark_worker --level L --method M --n N ...` per configuration and
reads the JSON line it prints (peak memory of one step, then the timed steps). What is measured, and how, is described
in benchmark.py's docstring.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import time
from pathlib import Path

VARIANT_OF = {
    "dot": ("dot", {}), "expressive": ("expressive", {}), "neural": ("neural", {}), "cdape": ("cdape", {}),
    "cdape_kerple": ("cdape", {"bias": "kerple"}), "expressive_flex": ("expressive", {}),
    "neural_reference": ("neural", {}), "cdape_reference": ("cdape", {"bias": "kerple"}),
}
for _name in ("expressive", "neural", "cdape"):
    VARIANT_OF[f"{_name}_plain"] = VARIANT_OF[_name]
D_MODEL, HEADS, VOCAB = 512, 8, 4096
# Level "decode": a small model of each geometry decoding DECODE_NEW_TOKENS tokens per timed step from a cache of n - 1
# tokens (n = context); every attention layer runs the method.
DECODE_LAYERS, DECODE_NEW_TOKENS = 2, 16

# ---- the reference implementations, re-stated ---------------------------------------------------------------------

def neural_reference_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """NeuralAttention.forward of the reference code from the q/k/v heads on, with `neural`'s parameters."""
    import torch

    variant = module.attention_variant
    q = torch.nn.functional.linear(query, variant.query_down_weight[0], variant.query_down_bias[0])
    k = torch.nn.functional.linear(key, variant.key_down_weight[0], variant.key_down_bias[0])
    q = q.unsqueeze(3).repeat(1, 1, 1, q.shape[2], 1)  # [b, h, n, n, d']
    k = k.unsqueeze(2).repeat(1, 1, k.shape[2], 1, 1)
    qk_cat = torch.cat((q, k), dim=-1)  # [b, h, n, n, 2d']
    score = qk_cat
    last = len(variant.mlp_weights) - 1
    for index, (weight, bias) in enumerate(zip(variant.mlp_weights, variant.mlp_biases)):
        score = torch.nn.functional.linear(score, weight[0], bias[0])
        if index != last:
            score = torch.relu(score)
    score = score.squeeze(-1)
    mask = torch.ones_like(score).triu_(1).bool()
    score = score.masked_fill(mask, float("-inf"))
    attention = torch.softmax(score, dim=-1)
    out = torch.einsum("b h i j, b h j d -> b h i d", attention, value)
    return out.transpose(1, 2).contiguous(), None


def cdape_reference_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Kerple_DAPEV2.forward of the reference code, with the scaled scores it is handed and the causal softmax."""
    import torch

    variant = module.attention_variant
    x = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [b, h, n, n]
    n = x.shape[-1]
    diff = torch.tril(torch.arange(n).view(n, 1).repeat(1, n) + torch.arange(0, -n, -1)).to(x.dtype)
    p = variant.kerple_r1.clamp(min=1e-2)[:, None, None]
    a = variant.kerple_r2.clamp(min=1e-2)[:, None, None]
    bias = -p * torch.log(1 + a * diff)  # [h, n, n]
    x_a_bias = torch.cat((x, torch.tile(bias, (x.shape[0], 1, 1, 1))), dim=1)  # [b, 2h, n, n]
    hidden = torch.nn.functional.leaky_relu(variant.conv_in(torch.tril(x_a_bias)))
    logits = x + bias + variant.conv_out(hidden)
    causal = torch.ones(n, n, dtype=torch.bool).triu_(1)
    attention = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)
    return torch.matmul(attention, value).transpose(1, 2).contiguous(), None


# ---- one configuration (worker process) ---------------------------------------------------------------------------

def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def decode_model(method: str, n: int, arch: str = "gpt2"):
    """A small eval-mode model (DECODE_LAYERS layers, d_model 512, 8 heads, vocabulary 4096, no dropout) whose every
    attention layer runs `method` (sdpa, or a variant with its default options)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    import hf_neural_attention as hfna

    torch.manual_seed(0)
    if arch == "llama":  # Llama family: RoPE, grouped keys and values (8 query heads, 2 key-value heads), SwiGLU
        config = LlamaConfig(num_hidden_layers=DECODE_LAYERS, hidden_size=D_MODEL, num_attention_heads=HEADS,
                             num_key_value_heads=2, intermediate_size=4 * D_MODEL, vocab_size=VOCAB,
                             max_position_embeddings=n + 2 * DECODE_NEW_TOKENS, bos_token_id=0, eos_token_id=0,
                             pad_token_id=0)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(n_layer=DECODE_LAYERS, n_embd=D_MODEL, n_head=HEADS, vocab_size=VOCAB,
                            n_positions=n + 2 * DECODE_NEW_TOKENS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = GPT2LMHeadModel(config)
    if method == "sdpa":
        model.set_attn_implementation("sdpa")
    else:
        variant, options = VARIANT_OF[method]
        hfna.convert(model, variant, layers="all", **options)
    return model.eval()


def build_decode(method: str, n: int, batch: int, dtype: str = "fp32", arch: str = "gpt2"):
    """Cached generation: the cache holds n - 1 tokens of random keys and values (what they hold does not change the
    work of a step, and filling it this way skips a prefill that would dominate the run), and one step is
    `generate` of DECODE_NEW_TOKENS greedy tokens from the n-token context: DECODE_NEW_TOKENS one-row forward calls.
    After each step the cache is cropped back to n - 1 tokens (a slice, timed with the step: negligible)."""
    import torch
    from transformers import DynamicCache

    model = decode_model(method, n, arch)
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(1)
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        keys, values = (torch.randn(batch, heads, n - 1, head_dim, generator=generator) for _ in range(2))
        cache.update(keys, values, layer)
    ids = torch.randint(1, VOCAB, (batch, n), generator=generator)
    mask = torch.ones(batch, n, dtype=torch.long)
    settings = dict(max_new_tokens=DECODE_NEW_TOKENS, min_new_tokens=DECODE_NEW_TOKENS, do_sample=False,
                    use_cache=True, pad_token_id=0)

    def step():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **settings)
        assert out.shape == (batch, n + DECODE_NEW_TOKENS), out.shape
        cache.crop(n - 1 - cache.get_seq_length())  # back to the n - 1 context tokens

    return step, model


def decode_interleaved(methods: list[str], n: int, batch: int, dtype: str, arch: str, repeats: int,
                       budget_s: float) -> list[dict]:
    """Every method of one (context, batch, model) in this one process, their timed steps interleaved round by
    round (sdpa, dot, ..., sdpa, dot, ...): on a shared machine a burst of foreign load then slows every method
    alike, so the ratios hold within the run. Each method gets one warm-up step, then up to `repeats` rounds (fewer
    once the rounds used `budget_s` per method, at least two)."""
    steps = {method: build_decode(method, n, batch, dtype, arch)[0] for method in methods}
    for step in steps.values():
        step()  # warm-up
    times = {method: [] for method in methods}
    started = time.perf_counter()
    busy_before, own_before = cpu_busy_seconds(), sum(os.times()[:2])
    for _ in range(repeats):
        for method, step in steps.items():
            begin = time.perf_counter()
            step()
            times[method].append(time.perf_counter() - begin)
        if len(times[methods[0]]) >= 2 and time.perf_counter() - started > budget_s * len(methods):
            break
    wall = time.perf_counter() - started
    foreign = (cpu_busy_seconds() - busy_before) - (sum(os.times()[:2]) - own_before)
    foreign_cpu = round(max(0.0, foreign) / (wall * (os.cpu_count() or 1)), 3)
    results = []
    for method in methods:
        median = statistics.median(times[method])
        results.append({"method": method, "time_s": median, "runs": len(times[method]), "min_s": min(times[method]),
                        "max_s": max(times[method]), "tokens_per_s": batch * DECODE_NEW_TOKENS / median,
                        "foreign_cpu": foreign_cpu})
    return results


def build(method: str, level: str, n: int, dtype: str = "fp32", dropout: str = "0", batch: int = 1,
          arch: str = "gpt2"):
    """(step function running one step of the configuration, model)."""
    if level == "decode":
        return build_decode(method, n, batch, dtype, arch)
    if arch != "gpt2" and level != "model":
        raise ValueError(f"level {level!r} times a GPT2Attention module; the {arch} model runs at level 'model' only")
    import torch

    import hf_neural_attention as hfna

    model = training_model(method, n, dropout, arch)
    fast_paths = functools.partial(hfna.fast_paths, not method.endswith("_plain"),
                                   flex_inference=method == "expressive_flex")
    precision = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    if level == "model":
        return model_step(model, n, fast_paths, precision), model
    return layer_step(model, n, level == "inference", fast_paths, precision), model


def training_model(method: str, n: int, dropout: str, arch: str = "gpt2"):
    """A 1-layer model of the benchmark's geometry in training mode whose attention runs `method`: GPT-2, or a
    Llama-family one (RoPE, 2 key-value heads, SwiGLU; a stock LlamaConfig has no dropout, so `dropout` must be
    "0")."""
    import torch
    from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    import hf_neural_attention as hfna
    from hf_neural_attention.attention_interface import variant_mask

    torch.manual_seed(0)
    if arch == "llama":
        if dropout != "0":
            raise ValueError("the Llama-family benchmark model has no dropout (as a stock LlamaConfig): use dropout 0")
        model = LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=1, hidden_size=D_MODEL, num_attention_heads=HEADS, num_key_value_heads=2,
            intermediate_size=4 * D_MODEL, vocab_size=VOCAB, max_position_embeddings=max(n, 1024), bos_token_id=0,
            eos_token_id=0, pad_token_id=0))
    else:
        pdrop = 0.1 if dropout == "stock" else 0.0
        model = GPT2LMHeadModel(GPT2Config(
            n_layer=1, n_embd=D_MODEL, n_head=HEADS, n_positions=max(n, 1024), vocab_size=VOCAB,
            resid_pdrop=pdrop, embd_pdrop=pdrop, attn_pdrop=pdrop, bos_token_id=0, eos_token_id=0))
    if method in ("sdpa", "eager"):
        model.set_attn_implementation(method)
    else:
        variant, options = VARIANT_OF[method]
        hfna.convert(model, variant, layers="all", **options)
        if method.endswith("_reference"):
            function = neural_reference_forward if method == "neural_reference" else cdape_reference_forward
            AttentionInterface.register(method, function)
            AttentionMaskInterface.register(method, variant_mask)
            # not set_attn_implementation, which a converted model refuses (its config would stop naming its variant)
            model.config._attn_implementation = method
    return model.train()


def model_step(model, n: int, fast_paths, precision):
    """Level "model": the whole model's loss, forward and backward."""
    import torch

    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(1))

    def step():
        with fast_paths(), precision():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def layer_step(model, n: int, inference: bool, fast_paths, precision):
    """Levels "layer" (the attention module, forward and backward) and "inference" (its forward, no gradients)."""
    import torch
    from transformers.masking_utils import create_causal_mask

    attention = model.transformer.h[0].attn
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, n, D_MODEL, generator=generator).requires_grad_()
    grad = torch.randn(1, n, D_MODEL, generator=generator)
    # no cache, passed by position: Transformers renamed the argument (past_key_values -> cache)
    mask = create_causal_mask(model.config, hidden.detach(), None, None, position_ids=torch.arange(n)[None])
    if inference:
        model.eval()

        def step():
            with torch.no_grad(), fast_paths(), precision():
                attention(hidden, attention_mask=mask)

        return step

    def step():
        with fast_paths(), precision():
            output = attention(hidden, attention_mask=mask)[0]
        output.backward(grad.to(output.dtype))
        model.zero_grad(set_to_none=True)
        hidden.grad = None

    return step


def cpu_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _mallopt(option: int, value: int) -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(option, value)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def worker(args) -> dict:
    """One configuration: peak memory of one forward+backward, then the timed runs."""
    import gc

    # Memory phase: every allocation above 64 KiB is its own mapping, returned to the system when freed, so the
    # resident set follows the live tensors.
    _mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    import torch

    torch.set_num_threads(args.threads)
    step, _ = build(args.method, args.level, args.n, args.dtype, args.dropout, args.batch, args.arch)
    result = {"dtype": args.dtype, "dropout": args.dropout, "level": args.level, "method": args.method, "n": args.n,
              "batch": args.batch, "arch": args.arch, "threads": args.threads}
    step()  # warm-up: one-off allocations (thread pools, lazy inits, compilation) are not the method's
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    baseline = _status("VmRSS")
    step()
    result["peak_mib"] = (_status("VmHWM") - baseline) / 2**20

    # Timing phase: glibc's usual steady state (blocks below 32 MiB reused from the heap, larger ones mapped).
    _mallopt(M_MMAP_THRESHOLD, 32 << 20)
    _mallopt(M_TRIM_THRESHOLD, 64 << 20)
    times = []
    started = time.perf_counter()
    busy_before, own_before = cpu_busy_seconds(), sum(os.times()[:2])
    for index in range(args.warmup + args.repeats):
        begin = time.perf_counter()
        step()
        elapsed = time.perf_counter() - begin
        if index >= args.warmup:
            times.append(elapsed)
        # A slow configuration stops early once it has two timed runs and has used its time budget.
        if len(times) >= 2 and time.perf_counter() - started > args.budget_s:
            break
    result.update(time_s=statistics.median(times), runs=len(times), min_s=min(times), max_s=max(times))
    if args.level == "decode":  # generated tokens per second over the batch
        result["tokens_per_s"] = args.batch * DECODE_NEW_TOKENS / result["time_s"]
    # CPU time other processes took while this one was timed, as a share of all cores: a noise indicator.
    wall = time.perf_counter() - started
    foreign = (cpu_busy_seconds() - busy_before) - (sum(os.times()[:2]) - own_before)
    result["foreign_cpu"] = round(max(0.0, foreign) / (wall * (os.cpu_count() or 1)), 3)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--dropout", default="0")
    parser.add_argument("--batch", type=int, default=1, help="level decode: sequences decoded together")
    parser.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"], help="level decode: the model family")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--budget-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.level == "decode" and "," in args.method:  # several methods interleaved: a JSON list
        import torch

        torch.set_num_threads(args.threads)
        rows = decode_interleaved(args.method.split(","), args.n, args.batch, args.dtype, args.arch, args.repeats,
                                  args.budget_s)
        print(json.dumps([{"dtype": args.dtype, "dropout": args.dropout, "level": "decode", "n": args.n,
                           "batch": args.batch, "arch": args.arch, "threads": args.threads, **row} for row in rows]))
        return
    print(json.dumps(worker(args)))


if __name__ == "__main__":
    main()
