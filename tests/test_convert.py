"""convert(): weights kept, the dot control equals stock eager, function-preserving inits, layer targeting, mask
registration, and detection of attention modules by the AttentionInterface contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, PreTrainedModel, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_neural_attention as hfna
from hf_neural_attention.attention_interface import call_mask
from hf_neural_attention.injection import FALLBACK_ATTRIBUTE, VARIANT_ATTRIBUTE
from conftest import ALL_BUILDERS, VOCAB, added_parameters, converted, tiny_vit


def model_inputs(arch: str, batch: int = 2):
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16)}
    return {"input_ids": torch.randint(1, VOCAB, (batch, 12))}


def test_public_variants_and_registration():
    assert hfna.VARIANTS == ("dot", "expressive", "neural", "cdape")
    for name in hfna.VARIANTS:
        assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()
        assert name in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()


@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_model_hands_the_variant_a_real_causal_mask(variant):
    """A padded batch gets the boolean pattern from our mask function (without one, Transformers would pass None); a
    purely causal batch gets None, as SDPA does, and the attention function rebuilds the causal pattern from the
    module's is_causal without materialising it."""
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)
    config._attn_implementation = variant
    padding = torch.ones(2, 5, dtype=torch.long)
    padding[0, :2] = 0
    mask = create_causal_mask(config, torch.zeros(2, 5, 32), attention_mask=padding, past_key_values=None)
    assert mask is not None and mask.dtype == torch.bool
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(mask[:, 0], causal & padding.bool()[:, None, :])
    assert create_causal_mask(config, torch.zeros(2, 5, 32), attention_mask=None, past_key_values=None) is None
    layer = torch.nn.Module()
    layer.is_causal = True
    rebuilt = call_mask(layer, None, 5, 5, torch.device("cpu"), {})
    assert rebuilt.pure_causal and torch.equal(rebuilt.keep[0, 0], causal)


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
def test_dot_equals_stock_eager(arch):
    torch.manual_seed(0)
    stock = ALL_BUILDERS[arch]()
    stock.set_attn_implementation("eager")
    inputs = model_inputs(arch)
    if arch != "vit":
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][0, :2] = 0
    with torch.no_grad():
        expected = stock(**inputs).logits
        torch.manual_seed(0)
        model = hfna.convert(ALL_BUILDERS[arch](), "dot")
        actual = model(**inputs).logits
    assert model.config._attn_implementation == "dot"
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
@pytest.mark.parametrize("variant,options", [("cdape", {}), ("neural", {"combine": "add"})])
def test_function_preserving_retrofit(arch, variant, options):
    torch.manual_seed(0)
    stock = ALL_BUILDERS[arch]()
    state = {k: v.clone() for k, v in stock.state_dict().items()}
    inputs = model_inputs(arch)
    with torch.no_grad():
        expected = stock(**inputs).logits
        model = hfna.convert(stock, variant, layers="all", **options)
        actual = model(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    for name, tensor in state.items():  # every existing weight kept
        assert torch.equal(model.state_dict()[name], tensor), name
    assert added_parameters(model)


@pytest.mark.parametrize("arch", list(ALL_BUILDERS))
@pytest.mark.parametrize("variant", ["expressive", "neural"])
def test_non_preserving_variants_change_outputs(arch, variant):
    torch.manual_seed(0)
    stock = ALL_BUILDERS[arch]()
    inputs = model_inputs(arch)
    with torch.no_grad():
        expected = stock(**inputs).logits
    torch.manual_seed(0)
    model = hfna.convert(ALL_BUILDERS[arch](), variant, layers="all")
    with torch.no_grad():
        actual = model(**inputs).logits
    assert (actual - expected).abs().max() > 1e-4


@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_vit_bidirectional_all_variants(variant):
    model = converted(tiny_vit, variant)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        # Bidirectional: the last patch influences the first token's output (CLS), unlike a causal model.
        changed = pixels.clone()
        changed[:, :, -4:, -4:] += 1.0
        hidden = model.vit(pixel_values=pixels).last_hidden_state
        hidden_changed = model.vit(pixel_values=changed).last_hidden_state
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert (hidden[:, 0] - hidden_changed[:, 0]).abs().max() > 1e-5


def test_layers_default_explicit_and_untouched():
    neural = hfna.convert(ALL_BUILDERS["gpt2"](), "neural")  # paper defaults
    attention = [m for _, m in hfna.find_attention_modules(neural)]
    assert hasattr(attention[0], VARIANT_ATTRIBUTE) and not hasattr(attention[1], VARIANT_ATTRIBUTE)
    assert getattr(attention[1], FALLBACK_ATTRIBUTE) == "sdpa"
    assert neural.config.attention_variant == "neural"
    assert neural.config.attention_variant_options == {
        "proj_dim": 1, "hidden_dims": [1, 1], "per_head": False, "combine": "replace", "activation": "relu",
        "init": "reference"}

    cdape = converted(ALL_BUILDERS["llama"], "cdape", layers=None, perturb=False)
    assert cdape.config.attention_variant_layers == [0, 1]
    one = converted(ALL_BUILDERS["llama"], "cdape", layers=[1], perturb=False)
    attention = [m for _, m in hfna.find_attention_modules(one)]
    assert not hasattr(attention[0], VARIANT_ATTRIBUTE) and hasattr(attention[1], VARIANT_ATTRIBUTE)


def test_untouched_layers_keep_eager_when_model_was_eager():
    torch.manual_seed(0)
    stock = ALL_BUILDERS["gpt2"]()
    stock.set_attn_implementation("eager")
    ids = torch.randint(1, VOCAB, (2, 8))
    with torch.no_grad():
        expected = stock(ids).logits
        model = hfna.convert(stock, "cdape", layers=[0])  # zero-init cdape on layer 0, eager on layer 1
        actual = model(ids).logits
    second = [m for _, m in hfna.find_attention_modules(model)][1]
    assert getattr(second, FALLBACK_ATTRIBUTE) == "eager"
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_paper_default_shapes():
    model = hfna.convert(ALL_BUILDERS["gpt2"](), "neural")  # head_dim 16 -> d' = max(1, 16 // 32) = 1
    names = {name.split(VARIANT_ATTRIBUTE + ".")[1]: p.shape for name, p in added_parameters(model).items()}
    assert names["query_down_weight"] == (1, 1, 16)
    assert [tuple(names[f"mlp_weights.{i}"]) for i in range(3)] == [(1, 1, 2), (1, 1, 1), (1, 1, 1)]
    module = hfna.NeuralAttention(8, 64)
    assert module.proj_dim == 2 and [w.shape[1:] for w in module.mlp_weights] == [(2, 4), (1, 2), (1, 1)]
    assert hfna.NeuralAttention(8, 96).proj_dim == 3
    cdape = hfna.CDAPEAttention(8, 64, bias="alibi")
    assert cdape.conv_in.weight.shape == (32, 16, 1, 3) and cdape.conv_out.weight.shape == (8, 32, 1, 3)
    assert torch.count_nonzero(cdape.conv_out.weight) == 0
    assert torch.count_nonzero(hfna.CDAPEAttention(8, 64, zero_init=False).conv_out.weight) > 0


# A model outside Transformers' zoo whose attention follows the AttentionInterface contract.
class ToyConfig(PretrainedConfig):
    model_type = "toy_attention_test"

    def __init__(self, hidden_size=32, num_attention_heads=4, **kwargs):
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        super().__init__(**kwargs)


class ToyAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.is_causal = True
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, hidden_states):
        b, n, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        out, _ = attention_interface(self, q, k, v, None, scaling=self.head_dim**-0.5)
        return out.reshape(b, n, -1)


class ToyModel(PreTrainedModel):
    config_class = ToyConfig
    _supports_attention_backend = True
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList([ToyAttention(config) for _ in range(3)])
        self.post_init()

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_detects_any_attention_interface_module():
    model = ToyModel(ToyConfig())
    hfna.convert(model, "expressive", layers=[0, 2], scale=True)
    found = [name for name, _ in hfna.find_attention_modules(model)]
    assert found == ["layers.0", "layers.1", "layers.2"]
    x = torch.randn(2, 6, 32)
    out = model(x)
    changed = x.clone()
    changed[:, 4] += 1.0
    # Causal even though the toy model passes no mask: the None mask is rebuilt from module.is_causal.
    torch.testing.assert_close(model(changed)[:, :4], out[:, :4], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["dot", "expressive"])
def test_parameter_free_variants_run_by_name(variant):
    """set_attn_implementation alone (no convert) runs the parameter-free variants with default options."""
    torch.manual_seed(0)
    selected = ALL_BUILDERS["gpt2"]()
    selected.set_attn_implementation(variant)
    torch.manual_seed(0)
    converted_model = hfna.convert(ALL_BUILDERS["gpt2"](), variant)
    ids = torch.randint(1, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(selected(ids).logits, converted_model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["neural", "cdape"])
def test_variants_with_parameters_need_convert(variant):
    model = ALL_BUILDERS["gpt2"]()
    model.set_attn_implementation(variant)
    with pytest.raises(ValueError, match=rf"has no '{variant}' parameters\. A variant checkpoint .* use hf_neural_attention.convert"):
        model(torch.randint(1, VOCAB, (1, 4)))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_convert_leaves_other_models_built_from_the_same_config_as_they_were(arch):
    """A research script builds a baseline and a variant from one config object: convert gives the variant its own
    copy, so the baseline keeps running stock attention and Auto classes still build stock models from the config."""
    from transformers import AutoModelForCausalLM

    config = ALL_BUILDERS[arch]().config
    stock_class, implementation = type(config), config._attn_implementation
    torch.manual_seed(0)
    baseline = AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(0)
    variant = hfna.convert(AutoModelForCausalLM.from_config(config).eval(), "neural")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    assert type(config) is stock_class and config._attn_implementation == implementation
    assert not hasattr(config, "attention_variant")
    assert all(module.config is config for module in baseline.modules() if hasattr(module, "config"))
    assert all(module.config is variant.config for module in variant.modules() if hasattr(module, "config"))
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(config).eval()
    assert type(fresh) is type(baseline) and not added_parameters(fresh)
    with torch.no_grad():
        torch.testing.assert_close(baseline(ids).logits, fresh(ids).logits, rtol=0, atol=0)
        variant(ids)
    assert variant.config.attention_variant == "neural" and variant.config._attn_implementation == "neural"
