"""What hfna-train sets up around the Trainer: `--help` describes every recipe field before Trainer's own, no
warnings on every run that the project causes (pin_memory on CPUs; DDP's unused-parameter search, which every
variant can do without because each of its parameters gets a gradient)."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import torch
from transformers import TrainingArguments

import hf_neural_attention as hfna
from conftest import ALL_BUILDERS, RICH_OPTIONS, converted
from hf_neural_attention.commands.train import help_text, main
from hf_neural_attention.experiments.recipes import DataArguments, ModelArguments
from hf_neural_attention.experiments.training import quiet_defaults


def field_blocks(text: str) -> dict[str, str]:
    """{option name: its help block} of argparse's formatted help."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"  --([a-z0-9_]+)", line)
        if match:
            current = match.group(1)
            blocks.setdefault(current, "")
            line = re.sub(r"^  (--[\w-]+ ?(\[?[A-Z_]+\]?)?,? ?)+", "", line)
        elif not line.startswith("    "):
            current = None
        if current is not None:
            blocks[current] += " " + line.strip()
    return blocks


def test_help_describes_every_recipe_field_before_the_training_arguments(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text == help_text() + "\n"
    blocks = field_blocks(text)
    recipe_fields = [f.name for cls in (ModelArguments, DataArguments) for f in dataclasses.fields(cls)]
    for name in recipe_fields:
        description = re.sub(r"\(default: .*?\)", "", blocks.get(name, "")).strip()
        assert len(description) > 10, f"--{name} has no help text: {blocks.get(name)!r}"
    # the recipe's own fields come first, under their headings; Trainer's ~100 after theirs
    model_heading, data_heading, training_heading = (text.index(f"{kind} fields (") for kind in
                                                     ("model", "data", "training"))
    assert model_heading < text.index("--hidden_size") < data_heading < text.index("--block_size")
    assert max(text.index(f"  --{name} ") for name in recipe_fields) < training_heading < text.index("--output_dir")
    assert text.index("--learning_rate") > training_heading


def test_quiet_defaults_without_a_gpu(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")  # not use_cpu: a CPU machine all the same
    assert args.device.type == "cpu" and args.dataloader_pin_memory and args.ddp_find_unused_parameters is None
    quiet_defaults(args)
    assert args.dataloader_pin_memory is False and args.ddp_find_unused_parameters is False
    chosen = TrainingArguments(output_dir=str(tmp_path), report_to="none", ddp_find_unused_parameters=True)
    quiet_defaults(chosen)
    assert chosen.ddp_find_unused_parameters is True  # a recipe's choice stays


@pytest.mark.slow
def test_a_cpu_run_without_use_cpu_warns_nothing_about_pin_memory(tmp_path, data_cache):
    from test_trainer_and_recipes import tiny_recipe, train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_recipe(tmp_path, data_cache, use_cpu=False, max_steps=1))
    assert not [w for w in caught if "pin_memory" in str(w.message)]


EXTRA_OPTIONS = {"neural": [{"per_head": True}], "cdape": [{"bias": "alibi"}, {"bias": "kerple"}],
                 "expressive": [{}], "dot": [{}]}


@pytest.mark.parametrize("architecture", sorted(ALL_BUILDERS))
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_every_parameter_gets_a_gradient(architecture, variant):
    """What lets DDP run without find_unused_parameters (experiments/training.py quiet_defaults): a parameter
    without a gradient would stop DDP's reduction at the first step."""
    for options in [{}, *EXTRA_OPTIONS[variant]]:
        model = converted(ALL_BUILDERS[architecture], variant, **options).train()
        if architecture == "vit":
            loss = model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 3])).loss
        else:
            tokens = torch.randint(0, model.config.vocab_size, (2, 12))
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (options, missing)
