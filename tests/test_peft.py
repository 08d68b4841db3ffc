"""PEFT LoRA on a converted model: adapters on the attention projections AND on cdape's own convolutions run (on the
plain and chunked paths), get gradients, and save, reload and merge to the same outputs."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")  # in .[dev]; the library itself never needs it
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import hf_neural_attention as hfna  # noqa: E402
from conftest import CAUSAL_BUILDERS, VOCAB, converted  # noqa: E402

TARGETS = ["q_proj", "v_proj", "conv_in", "conv_out"]


def lora_model(dropout: float = 0.0):
    base = converted(CAUSAL_BUILDERS["llama"], "cdape")
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=TARGETS))
    with torch.no_grad():  # LoRA's B starts at zero; move it so the adapters change the outputs
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


def batch():
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "chunked"])
def test_lora_on_cdape_convolutions_runs_and_gets_gradients(fast):
    model = lora_model().train()
    conv_loras = [n for n, _ in model.named_parameters() if "lora_" in n and "conv_" in n]
    assert len(conv_loras) == 8  # 2 layers x (conv_in, conv_out) x (A, B)
    with hfna.fast_paths(fast, **({"min_size": 0, "chunk_size": 3} if fast else {})):
        loss = model(**batch()).loss
        with model.disable_adapter():
            loss_without = model(**batch()).loss
    assert abs(loss.item() - loss_without.item()) > 1e-4, "the adapters change nothing"
    loss.backward()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_lora_fast_path_equals_plain_path_and_merge_and_reload_give_the_same_outputs(tmp_path):
    model = lora_model().eval()
    inputs = {"input_ids": batch()["input_ids"]}
    with torch.no_grad():
        with hfna.fast_paths(False):
            expected = model(**inputs).logits
        with hfna.fast_paths(True, min_size=0, chunk_size=3):
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(converted(CAUSAL_BUILDERS["llama"], "cdape"), tmp_path / "adapter").eval()
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_dropout_on_a_cdape_convolution_is_refused_in_training():
    model = lora_model(dropout=0.1).train()
    with pytest.raises(ValueError, match="lora_dropout=0.1;.* use lora_dropout=0"):
        model(**batch())
    model.eval()
    with torch.no_grad():
        model(input_ids=batch()["input_ids"])  # inference has no dropout: fine


def test_dora_on_a_cdape_convolution_is_refused():
    base = converted(CAUSAL_BUILDERS["llama"], "cdape")
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["conv_in"]))
    with pytest.raises(ValueError, match="cdape supports LoRA on its convolutions, not DoRA"):
        model(**batch())


def test_any_other_wrapper_of_a_cdape_convolution_is_refused():
    model = converted(CAUSAL_BUILDERS["llama"], "cdape")

    class Wrapped(torch.nn.Module):  # hides the Conv2d: cdape cannot read its weights, so it must not skip it
        def __init__(self, conv):
            super().__init__()
            self.inner = conv

        def forward(self, x):
            return self.inner(x)

    variant = model.model.layers[0].self_attn.attention_variant
    variant.conv_in = Wrapped(variant.conv_in)
    with pytest.raises(ValueError, match="wraps one in a way it cannot read"):
        model(**batch())


@pytest.mark.parametrize("variant", ["neural", "cdape"])
def test_modules_to_save_trains_the_whole_variant_module_and_reloads(variant, tmp_path):
    """modules_to_save=["attention_variant"]: PEFT trains a copy of each variant module (the original stays as it
    was), saves it with the adapter, and the reloaded PeftModel gives the same outputs."""
    torch.manual_seed(0)
    base = converted(CAUSAL_BUILDERS["llama"], variant, layers="all")
    original = {n: p.detach().clone() for n, p in base.named_parameters() if ".attention_variant." in n}
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["attention_variant"])).train()
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert trained and all(".attention_variant." in n for n in trained)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(**batch()).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trained)
    optimizer.step()
    copies = {n: p for n, p in model.named_parameters() if n in trained}
    assert any(not torch.equal(p, original[n.replace("base_model.model.", "").replace(
        ".modules_to_save.default", "")]) for n, p in copies.items()), "the variant's copy did not train"
    for name, parameter in original.items():  # PEFT's original modules are left alone
        assert torch.equal(base.get_parameter(name.replace(".attention_variant.",
                                                           ".attention_variant.original_module.")), parameter)
    model.eval()
    inputs = {"input_ids": batch()["input_ids"]}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = converted(CAUSAL_BUILDERS["llama"], variant, layers="all")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
