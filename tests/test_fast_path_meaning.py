"""The fast paths keep the plain path's meaning whatever surrounds them (issue 24): a recompute under other settings
(activation checkpointing) gives the reference gradients, settings are per thread, the chunk planner's host syncs do
not grow with n, and bf16 squared scores are as accurate on every path."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import GPT2Config, GPT2LMHeadModel

import hf_neural_attention as hfna
from hf_neural_attention import dispatch
from hf_neural_attention.masks import split_attention_mask
from hf_neural_attention.registry import build_variant
from hf_neural_attention.runtime import FAST_PATHS, current_settings, fast_paths
from conftest import VOCAB

OPTIONS = {"dot": {}, "expressive": {"form": "rational", "scale": True},
           "neural": {"per_head": True, "proj_dim": 4, "hidden_dims": [6, 3]},
           "cdape": {"zero_init": False, "bias": "kerple", "hidden_size": 8}}
FORWARD_SETTINGS = {"min_size": 0, "chunk_size": 3}


def gpt2_with_stock_dropout(variant: str) -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=VOCAB, bos_token_id=0,
                        eos_token_id=0)  # attn_pdrop, resid_pdrop, embd_pdrop 0.1, as a stock config
    torch.manual_seed(0)
    model = hfna.convert(GPT2LMHeadModel(config), variant, layers="all", **OPTIONS[variant]).double().train()
    with torch.no_grad():  # zero-initialised variant parts away from zero, so their gradients count
        for name, parameter in model.named_parameters():
            if "attention_variant" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def gradients(model, ids, backward_settings=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    with fast_paths(True, **FORWARD_SETTINGS):
        loss = model(input_ids=ids, labels=ids).loss
    with backward_settings if backward_settings is not None else fast_paths(True, **FORWARD_SETTINGS):
        loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", list(OPTIONS))
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_recompute_under_other_settings_gives_the_reference_gradients(variant, reentrant):
    """Forward under one chunk layout, backward (where checkpointing runs the forward again) under the plain path or
    another chunk size: the same dropout mask is drawn, so the gradients are the uncheckpointed ones."""
    model = gpt2_with_stock_dropout(variant)
    ids = torch.randint(1, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    reference = gradients(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    for backward_settings in (fast_paths(False), fast_paths(True, min_size=0, chunk_size=5)):
        recomputed = gradients(model, ids, backward_settings)
        assert recomputed.keys() == reference.keys()
        for name, expected in reference.items():
            torch.testing.assert_close(recomputed[name], expected, rtol=1e-6, atol=1e-12, msg=name)
    torch.manual_seed(12)  # premise: dropout acts, so a recompute with another mask would show
    with fast_paths(True, **FORWARD_SETTINGS):
        model(input_ids=ids, labels=ids).loss.backward()
    other = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(other[name], reference[name] * 2) for name in reference)


def test_fast_paths_are_per_thread_and_restore_only_what_they_set():
    barrier = threading.Barrier(2, timeout=30)
    seen = {}

    def worker(name, **settings):
        with fast_paths(True, **settings):
            barrier.wait()  # both blocks are open now
            current = current_settings()
            seen[name] = (current.backend, current.chunk_size)
            barrier.wait()

    threads = [threading.Thread(target=worker, args=("a",), kwargs={"backend": "chunked", "chunk_size": 5}),
               threading.Thread(target=worker, args=("b",), kwargs={"backend": "triton"})]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": ("chunked", 5), "b": ("triton", None)}
    assert current_settings() is FAST_PATHS and FAST_PATHS.backend == "auto" and FAST_PATHS.chunk_size is None

    saved = FAST_PATHS.chunk_elements
    try:
        with fast_paths(True, min_size=0):
            FAST_PATHS.chunk_elements = 1234  # a process-wide change made inside a block
            assert current_settings().chunk_elements == 1234 and current_settings().min_size == 0
        assert FAST_PATHS.chunk_elements == 1234, "the block restores only the fields it set"
        assert current_settings().min_size == 1 << 17
    finally:
        FAST_PATHS.chunk_elements = saved


class SyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for the device."""

    SYNCING = {"nonzero", "item", "__bool__", "tolist", "__int__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_syncs(variant, n: int, padded: bool, backward: bool) -> int:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, requires_grad=backward) for _ in range(3))
    keep = None
    if padded:  # a left-padded causal batch: Transformers hands the whole boolean mask
        keep = torch.ones(n, n, dtype=torch.bool).tril()[None, None].clone()
        keep[..., :3] = False
        keep[..., :3, :3] = torch.eye(3, dtype=torch.bool)
    mask = split_attention_mask(keep, n, n, True, q.device)
    with SyncCounter() as counter, fast_paths(True, min_size=0, chunk_size=64), torch.set_grad_enabled(backward):
        output, weights = dispatch.attention(variant, q, k, v, mask, 8**-0.5, 0.1)
        if backward:
            output.sum().backward()
    assert weights is None
    return counter.count


@pytest.mark.slow
@pytest.mark.parametrize("name", ["expressive", "neural", "cdape"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_host_syncs_do_not_grow_with_the_sequence(name, padded):
    """A forward with attention dropout at n = 512 (8 chunks) and n = 4096 (64 chunks) makes the same syncs: one
    transfer of all chunk extents for a padded mask, none for pure causality; backward adds none."""
    variant = build_variant(name, 1, 8, **({"bias": "kerple", "hidden_size": 4} if name == "cdape" else {}))
    counts = [count_syncs(variant, n, padded, backward=False) for n in (512, 4096)]
    assert counts[0] == counts[1] <= (1 if padded else 0), counts
    assert count_syncs(variant, 512, padded, backward=True) == counts[0]


@pytest.mark.parametrize("settings", [{"enabled": False}, {"min_size": 0, "chunk_size": 5},
                                      {"min_size": 0, "chunk_size": 16, "backend": "triton"}],
                         ids=["plain", "chunked", "kernels"])
def test_bf16_softmax_square_is_accurate_on_every_path(settings):
    """Squaring a bf16-rounded q.k doubles its error: every path keeps q.k in float32."""
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 48, 64, generator=generator) * 0.25 for _ in range(3))
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    variant = build_variant("expressive", 4, 64, form="softmax_square")
    mask = split_attention_mask(None, 48, 48, True, q.device)
    scores = (q.double() @ k.double().transpose(-1, -2)).square()
    scores = scores.masked_fill(~torch.ones(48, 48, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v.double()
    enabled = settings.pop("enabled", True)
    with fast_paths(enabled, **settings):
        output, _ = dispatch.attention(variant, q, k, v, mask, 64**-0.5, 0.0)
    assert (output.double() - expected).abs().max() < 0.05


def dynamo_breaks(model, ids) -> int:
    torch._dynamo.reset()
    with fast_paths(True, min_size=0, chunk_size=8):
        return torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids).graph_break_count


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["expressive", "neural", "cdape"])
def test_torch_compile_keeps_the_chunked_engine_in_the_graph(variant):
    """The chunked engine is a custom op with a fake implementation, and nothing on the way to it syncs or reads a
    ContextVar while traced: a converted GPT-2 (training, fast path on) breaks its graph no more than the stock SDPA
    model (18 graphs before), and the compiled model's loss and gradients equal eager's."""
    from conftest import tiny_gpt2

    ids = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    stock = tiny_gpt2().train()
    model = hfna.convert(tiny_gpt2(), variant, layers="all", **OPTIONS[variant]).train()
    assert dynamo_breaks(model, ids) <= dynamo_breaks(stock, ids)
    losses, grads = [], []
    for run in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        with fast_paths(True, min_size=0, chunk_size=8):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_the_chunked_op_passes_opcheck():
    from hf_neural_attention import chunked

    variant = build_variant("neural", 2, 8, proj_dim=2, hidden_dims=[2, 1])
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=generator, requires_grad=True) for _ in range(3))
    mask = split_attention_mask(None, 9, 9, True, q.device)
    rows, shared = variant.prepare(q, k, mask, 8**-0.5)
    inputs = [*rows, *shared]
    args = (v, inputs, [False] * len(inputs), None, None, torch.tensor(5), id(variant), len(rows), 8**-0.5, 0.1,
            True, True, 4)
    torch.library.opcheck(chunked._chunked_forward, args)


@pytest.mark.triton
@pytest.mark.parametrize("name", ["expressive", "neural"])
def test_the_three_paths_draw_one_dropout_mask(name):
    """Training mode, attention dropout 0.25, the same seed: the plain path, the chunked engine and the Triton kernels
    (interpreter, float32) give the same output and gradients, so any of them may recompute another's forward."""
    variant = build_variant(name, 4, 16, **({"proj_dim": 4, "hidden_dims": [4, 2]} if name == "neural" else {}))
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 21, 16, generator=generator) for _ in range(3))
    keep = torch.rand(2, 1, 21, 21, generator=generator) < 0.8
    keep[..., -1] = True
    mask = split_attention_mask(keep, 21, 21, False, q.device)
    results = []
    for settings in ({"enabled": False}, {"min_size": 0, "chunk_size": 3, "backend": "chunked"},
                     {"min_size": 0, "backend": "triton"}):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(5)
        with fast_paths(settings.pop("enabled", True), **settings):
            output, _ = dispatch.attention(variant, *leaves, mask, 16**-0.5, 0.25)
        results.append((output, *torch.autograd.grad(output.square().sum(), leaves)))
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.manual_seed(6)
    moved, _ = dispatch.attention(variant, q, k, v, mask, 16**-0.5, 0.25)
    assert not torch.allclose(moved, results[0][0]), "another seed, another mask"
