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
