"""The fast paths (query-row chunks recomputed in backward, compiled FlexAttention for inference) give the plain paths'
numbers: outputs and gradients on random inputs with masks, GQA, cached decoding and left padding, and the float64
references of test_formulas. Tiny inputs normally take the plain path (FAST_PATHS.min_size), so every test here forces
the fast path with several chunks. Speed is measured by scripts/benchmark.py, not here."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_neural_attention as hfna
from hf_neural_attention import chunked
from hf_neural_attention.masks import KeyMask, make_chunks
from hf_neural_attention.runtime import FAST_PATHS, fast_paths
from conftest import ALL_BUILDERS, CAUSAL_BUILDERS, VOCAB, added_parameters, converted
from test_formulas import CASES, D, Holder, as_additive, make_module, random_inputs, reference_output

FORCED = {"min_size": 0, "chunk_size": 3}  # several chunks even on tiny inputs
FAST_CASES = [(variant, options) for variant, options in CASES if variant != "dot"]
IDS = [f"{variant}-{options}" for variant, options in FAST_CASES]


def call(variant, module, q, k, v, mask, is_causal=False, **kwargs):
    return ALL_ATTENTION_FUNCTIONS[variant](Holder(module, is_causal), q, k, v, mask, scaling=D**-0.5, dropout=0.0,
                                            **kwargs)


def build_mask(keep: torch.Tensor, kind: str, dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(mask handed to the function, additive bias it stands for) for a boolean keep pattern."""
    bias = torch.zeros(keep.shape, dtype=torch.float64)
    if kind == "bool":
        return keep, bias
    if kind == "additive-with-bias":
        bias = (torch.randn(keep.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.5)
        bias = bias.masked_fill(~keep, 0.0)
        return (as_additive(keep, torch.float64, "min") + bias).to(dtype), bias
    if kind == "none":
        return None, bias
    raise ValueError(kind)


@pytest.mark.parametrize("variant,options", FAST_CASES, ids=IDS)
@pytest.mark.parametrize("mask_kind", ["bool", "additive-with-bias"])
def test_fast_path_matches_float64_reference(variant, options, mask_kind):
    q, k, v, keep = random_inputs(scale=0.3)
    module = make_module(variant, options)
    mask, bias = build_mask(keep, mask_kind, torch.float64)
    with torch.no_grad(), fast_paths(True, **FORCED):
        output, weights = call(variant, module, q, k, v, mask)
    assert weights is None, "the fast path did not run"
    expected, _ = reference_output(variant, module, q, k, v, keep, bias)
    torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-12)


def run_with_grads(variant, module, q, k, v, mask, fast: bool, is_causal=False):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    module.zero_grad(set_to_none=True)
    settings = FORCED if fast else {}
    with fast_paths(fast, **settings):
        output, weights = call(variant, module, q, k, v, mask, is_causal=is_causal)
    assert (weights is None) == fast
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(11), dtype=output.dtype)
    (output * upstream).sum().backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return output.detach(), grads


@pytest.mark.parametrize("variant,options", FAST_CASES, ids=IDS)
@pytest.mark.parametrize("mask_kind", ["bool", "additive-with-bias", "causal-none", "fully-masked-rows"])
def test_fast_path_outputs_and_gradients_equal_plain_path_fp32_gqa(variant, options, mask_kind):
    """key/value have 2 heads for 4 query heads (GQA); gradients w.r.t. q, k, v and every parameter."""
    is_causal = mask_kind == "causal-none"
    q_len, k_len = (6, 9) if is_causal else (7, 10)
    q, k, v, keep = random_inputs(dtype=torch.float32, q_len=q_len, k_len=k_len, scale=0.3)
    if mask_kind == "fully-masked-rows":
        keep = keep.clone()
        keep[0, :, 2] = False  # padding queries: softmax variants give them uniform weights over all keys
        keep[1, :, -1] = False
    kind = {"causal-none": "none", "fully-masked-rows": "bool"}.get(mask_kind, mask_kind)
    mask, _ = build_mask(keep, kind, torch.float32)
    module = make_module(variant, options, dtype=torch.float32)
    plain_output, plain_grads = run_with_grads(variant, module, q, k, v, mask, fast=False, is_causal=is_causal)
    fast_output, fast_grads = run_with_grads(variant, module, q, k, v, mask, fast=True, is_causal=is_causal)
    torch.testing.assert_close(fast_output, plain_output, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == fast_grads.keys()
    for name, expected in plain_grads.items():
        assert expected is not None, name
        torch.testing.assert_close(fast_grads[name], expected, rtol=1e-4, atol=1e-5, msg=name)


def chunk_layout(keep, q_len, k_len, rows):
    return [(c.start, c.end, c.key_end, c.mask_from) for c in make_chunks(KeyMask(keep, None, True), q_len, k_len, rows)]


def test_chunks_skip_keys_masked_for_the_whole_chunk():
    keep = torch.ones(7, 10, dtype=torch.bool).tril(diagonal=3)[None, None]
    # (first row, end row, key extent, first column with a masked position)
    assert chunk_layout(keep, 7, 10, 3) == [(0, 3, 6, 4), (3, 6, 9, 7), (6, 7, 10, 10)]
    keep = keep.clone()
    keep[..., 4, :] = False  # a fully masked row keeps every key (uniform weights in the plain path)
    assert chunk_layout(keep, 7, 10, 3)[1] == (3, 6, 10, 0)
    assert chunk_layout(None, 7, 10, 4) == [(0, 4, 10, 10), (4, 7, 10, 10)]
    padded = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    padded[1, :, :, :2] = False  # left padding of the second row
    assert chunk_layout(padded, 5, 5, 5) == [(0, 5, 5, 0)]


def model_loss(model, arch, padded: bool):
    generator = torch.Generator().manual_seed(5)
    if arch == "vit":
        pixels = torch.randn(3, 3, 16, 16, generator=generator)
        return model(pixel_values=pixels, labels=torch.tensor([0, 3, 4])), None
    ids = torch.randint(1, VOCAB, (3, 12), generator=generator)
    attention_mask = torch.ones_like(ids)
    if padded:
        attention_mask[0, :4] = 0  # left padding
    output = model(input_ids=ids, attention_mask=attention_mask, labels=ids)
    return output, attention_mask


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
@pytest.mark.parametrize("variant", ["expressive", "neural", "cdape"])
def test_model_logits_and_gradients_equal_plain_path(arch, variant, monkeypatch):
    calls = []
    original = chunked._forward_chunks

    def counting_forward(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(chunked, "_forward_chunks", counting_forward)
    results = {}
    for fast in (False, True):
        model = converted(ALL_BUILDERS[arch], variant).train()  # every dropout is 0 in the tiny configs
        with fast_paths(fast, **(FORCED if fast else {})):
            output, _ = model_loss(model, arch, padded=arch != "vit")
            output.loss.backward()
        results[fast] = (output.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == 2, "the fast path should run in both attention layers"
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for name, expected in results[False][1].items():
        actual = results[True][1][name]
        if expected is None:
            assert actual is None, name
            continue
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", list(CAUSAL_BUILDERS))
@pytest.mark.parametrize("variant", ["expressive", "neural", "cdape"])
def test_cached_decoding_on_fast_path_equals_plain_full_forward(arch, variant):
    model = converted(CAUSAL_BUILDERS[arch], variant)
    ids = torch.randint(1, VOCAB, (2, 14))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0
    with torch.no_grad():
        with fast_paths(False):
            full = model(ids, attention_mask=attention_mask).logits
        with fast_paths(True, **FORCED):
            prefill = model(ids[:, :10], attention_mask=attention_mask[:, :10], use_cache=True)
            cache, steps = prefill.past_key_values, []
            for position in range(10, 14):
                out = model(ids[:, position : position + 1], attention_mask=attention_mask[:, : position + 1],
                            past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits)
    # Padding queries (row 0, positions 0-2) see no key; their outputs are never used and depend on the key count.
    torch.testing.assert_close(prefill.logits[0, 3:], full[0, 3:10], rtol=0, atol=1e-5)
    torch.testing.assert_close(prefill.logits[1], full[1, :10], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 10:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["expressive", "neural", "cdape"])
def test_attention_weights_are_returned_when_requested(variant):
    """output_attentions takes the plain path, which returns the weights; same logits as the fast path."""
    model = converted(CAUSAL_BUILDERS["gpt2"], variant)
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad(), fast_paths(True, **FORCED):
        recorded = model(ids, output_attentions=True)
        fast = model(ids)
    assert len(recorded.attentions) == 2 and all(a is not None and a.shape == (2, 4, 9, 9) for a in recorded.attentions)
    torch.testing.assert_close(recorded.logits, fast.logits, rtol=1e-5, atol=1e-5)
    q, k, v, keep = random_inputs(dtype=torch.float32)
    module = make_module(variant, dict(FAST_CASES)[variant], dtype=torch.float32)
    with torch.no_grad(), fast_paths(True, **FORCED):
        assert call(variant, module, q, k, v, keep, output_attentions=True)[1] is not None
        assert call(variant, module, q, k, v, keep)[1] is None


@pytest.mark.parametrize("variant", ["expressive", "neural", "cdape"])
def test_fast_path_falls_back_to_plain_where_it_does_not_apply(variant):
    q, k, v, keep = random_inputs(dtype=torch.float32)
    module = make_module(variant, dict(FAST_CASES)[variant], dtype=torch.float32)
    function = ALL_ATTENTION_FUNCTIONS[variant]
    with torch.no_grad():
        with fast_paths(False, **FORCED):  # switched off
            assert call(variant, module, q, k, v, keep)[1] is not None
        with fast_paths(True):  # below min_size
            assert q.shape[2] * k.shape[2] < FAST_PATHS.min_size
            assert call(variant, module, q, k, v, keep)[1] is not None
        with fast_paths(True, **FORCED):  # dropout and half precision run on the fast path too
            holder = Holder(module).train()
            assert function(holder, q, k, v, keep, scaling=D**-0.5, dropout=0.1)[1] is None
            bf16 = make_module(variant, dict(FAST_CASES)[variant], dtype=torch.bfloat16)
            half = [t.to(torch.bfloat16) for t in (q, k, v)]
            assert call(variant, bf16, *half, keep)[1] is None


def test_default_chunking_of_a_long_sequence_equals_plain_path():
    """The automatic chunk size (no forced settings) on a sequence above min_size, with padding and GQA."""
    torch.manual_seed(0)
    model = converted(CAUSAL_BUILDERS["llama"], "cdape")
    config = model.config
    config.max_position_embeddings = 512
    ids = torch.randint(1, VOCAB, (2, 160))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :17] = 0
    with torch.no_grad():
        with fast_paths(False):
            plain = model(ids, attention_mask=attention_mask).logits
        with fast_paths(True, chunk_elements=4096, min_size=160 * 160):
            fast = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles FlexAttention (torch.compile)
@pytest.mark.parametrize("variant,options", [("expressive", {"form": "rational", "scale": True}), ("dot", {})])
def test_flex_attention_inference_equals_plain_path(variant, options):
    """Compiled FlexAttention (forward only): masks, an additive bias and a fully masked row."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, keep = random_inputs(dtype=torch.float32, q_len=9, k_len=11, scale=0.3)
    keep = keep.clone()
    keep[1, :, 3] = False
    mask, _ = build_mask(keep, "additive-with-bias", torch.float32)
    module = hfna.build_variant(variant, 4, D, **options)
    with torch.no_grad():
        with fast_paths(False):
            expected, _ = call(variant, module, q, k, v, mask)
        with fast_paths(True, min_size=0, flex_inference=True):
            output, weights = call(variant, module, q, k, v, mask)
    assert weights is None, "FlexAttention did not run"
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    q.requires_grad_()  # a gradient is needed: FlexAttention has no CPU backward, the chunked or plain path runs
    with fast_paths(True, min_size=0, flex_inference=True):
        output, _ = call(variant, module, q, k, v, mask)
    torch.testing.assert_close(output.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["neural", "cdape"])
def test_gradient_checkpointing_on_fast_path_gives_plain_gradients(variant):
    """Activation checkpointing re-runs the chunked forward; gradients match the plain path without checkpointing."""
    grads = {}
    for fast in (False, True):
        model = converted(CAUSAL_BUILDERS["llama"], variant).train()
        if fast:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        with fast_paths(fast, **(FORCED if fast else {})):
            model_loss(model, "llama", padded=True)[0].loss.backward()
        grads[fast] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, expected in grads[False].items():
        torch.testing.assert_close(grads[True][name], expected, rtol=1e-4, atol=1e-5, msg=name)
