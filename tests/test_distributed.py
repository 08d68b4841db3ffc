"""FSDP on two CPU processes (gloo) through the paths users take: Trainer's `fsdp` under torchrun and an accelerate
FSDP config, for the variants with parameters of their own (neural per_head, cdape with kerple), attention dropout
off. The sharded runs train the same model as one process with the same global batch (2 x 4 = 8), their full and
sharded state-dict saves reload with the variant, a sharded checkpoint resumes, and a launch that would train two
copies is refused. Each test starts one or two 2-process launches (~15-30 s each on 2 cores)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_trainer_and_recipes import REPO, tiny_recipe, train

pytestmark = pytest.mark.slow

VARIANTS = {"neural": {"per_head": True, "init": "alive"}, "cdape": {"bias": "kerple"}}
# float32 on both sides; the sharded run reduces gradients in another order. Losses: measured <= 1e-7 relative.
RELATIVE_TOLERANCE = 1e-5
# Weights after 4 AdamW steps of lr 1e-2: Adam's normalised step turns reduction-order noise in near-zero gradients
# into weight differences up to ~1e-4 (measured 6.5e-5, on neural's MLP biases); a gradient that was not averaged
# over the processes, or a shard that was not trained, moves weights by ~1e-2 per step.
WEIGHT_TOLERANCE = 1e-3


def recipe(output_dir, cache, variant, **overrides) -> dict:
    return tiny_recipe(output_dir, cache, "gpt2", variant, attention_options=VARIANTS[variant], dropout=0.0,
                       learning_rate=1e-2, max_steps=4, skip_memory_metrics=True, **overrides)


def launch(launcher: list[str], recipe_dict: dict, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    recipe_file = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict))
    command = [sys.executable, "-m", *launcher, "-m", "hf_neural_attention.commands.train", str(recipe_file),
               *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def accelerate_launch(config: str, *arguments: str) -> list[str]:
    return ["accelerate.commands.launch", "--config_file", str(REPO / "configs" / config), *arguments,
            "--main_process_port", free_port()]


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def assert_same_training(sharded: dict, single: dict) -> None:
    assert sharded["world_size"] == 2 and sharded["distributed_type"] == "FSDP"
    # sharded for real: rank 0 holds about half of the parameter elements
    assert sharded["rank0_parameter_elements"] < 0.6 * sharded["parameters"]
    assert single["world_size"] == 1 and sharded["parameters"] == single["parameters"]
    assert sharded["variant_parameters"] == single["variant_parameters"] > 0
    assert sharded["loss_curve"]["train_steps"] == single["loss_curve"]["train_steps"] == [1, 2, 3, 4]
    assert sharded["loss_curve"]["train_loss"] == pytest.approx(single["loss_curve"]["train_loss"],
                                                                rel=RELATIVE_TOLERANCE)
    assert sharded["eval_loss"] == pytest.approx(single["eval_loss"], rel=RELATIVE_TOLERANCE)


def assert_same_weights(folder: Path, reference: Path) -> None:
    """The saved weights equal the one-process run's, variant parameters included, and reload with the variant."""
    import hf_neural_attention as hfna  # noqa: F401 (registers the variant classes)
    from transformers import AutoModelForCausalLM

    saved, expected = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert saved.keys() == expected.keys() and any(".attention_variant." in key for key in saved)
    for key in saved:
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=WEIGHT_TOLERANCE, msg=key)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "VariantGPT2LMHeadModel"
    reference_model = AutoModelForCausalLM.from_pretrained(reference)
    assert model.config.attention_variant == reference_model.config.attention_variant
    assert model.config.attention_variant_options == reference_model.config.attention_variant_options
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference_model(tokens).logits, rtol=0,
                                   atol=WEIGHT_TOLERANCE)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, data_cache):
    """One-process runs with the global batch of the sharded runs (8), trained in this process."""
    runs = {}

    def run(variant: str) -> tuple[dict, Path]:
        if variant not in runs:
            output = tmp_path_factory.mktemp(f"single-{variant}")
            runs[variant] = (train(recipe(output, data_cache, variant, per_device_train_batch_size=8)), output)
        return runs[variant]

    return run


def test_trainer_fsdp_under_torchrun_neural_full_state_dict(tmp_path, data_cache, single_process):
    """Trainer's fsdp (FULL_STATE_DICT checkpoints) for neural per_head, whose per-head MLP weights FSDP shards by
    head: the same losses and weights as one process, and the step-2 checkpoint reloads with its variant."""
    single, single_dir = single_process("neural")
    output = tmp_path / "fsdp"
    result = launch(TORCHRUN, recipe(output, data_cache, "neural", save_strategy="steps", save_steps=2), tmp_path,
                    "--fsdp", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(results(output), single)
    assert_same_weights(output / "model", single_dir / "model")
    checkpoint = output / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "modeling_variants.py").is_file()
    assert not list(checkpoint.glob("_fsdp*.py"))  # the checkpoint's code is the variant's, not FSDP's wrapper
    assert "modeling_variants.VariantGPT2LMHeadModel" in (checkpoint / "config.json").read_text()
    assert "find_unused_parameters" not in result.stderr and "pin_memory" not in result.stderr


@pytest.fixture(scope="module")
def sharded_cdape(tmp_path_factory, data_cache):
    """cdape (kerple) under torchrun with SHARDED_STATE_DICT checkpoints every 2 steps and FSDP's own activation
    checkpointing."""
    tmp_path = tmp_path_factory.mktemp("sharded-cdape")
    output = tmp_path / "fsdp"
    fsdp_config = "{state_dict_type: SHARDED_STATE_DICT, activation_checkpointing: true}"
    result = launch(TORCHRUN, recipe(output, data_cache, "cdape", save_strategy="steps", save_steps=2), tmp_path,
                    "--fsdp", "true", "--fsdp_config", fsdp_config)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, output, fsdp_config


def test_sharded_state_dict_with_activation_checkpointing_cdape(sharded_cdape, single_process):
    single, single_dir = single_process("cdape")
    _, output, _ = sharded_cdape
    assert_same_training(results(output), single)
    checkpoint = output / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / "config.json").read_text())["attention_variant"] == "cdape"
    assert_same_weights(output / "model", single_dir / "model")  # the run's model/ holds the gathered weights


def test_resume_from_a_sharded_checkpoint(sharded_cdape, data_cache):
    tmp_path, output, fsdp_config = sharded_cdape
    resumed_dir = tmp_path / "resumed"
    result = launch(TORCHRUN, recipe(resumed_dir, data_cache, "cdape", save_strategy="no",
                                     resume_from_checkpoint=str(output / "checkpoint-2")), tmp_path,
                    "--fsdp", "true", "--fsdp_config", fsdp_config)
    assert result.returncode == 0, result.stderr[-3000:]
    full, resumed = results(output), results(resumed_dir)
    assert resumed["loss_curve"]["train_steps"] == [1, 2, 3, 4]
    assert resumed["loss_curve"]["train_loss"] == pytest.approx(full["loss_curve"]["train_loss"], rel=1e-6)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    assert_same_weights(resumed_dir / "model", output / "model")


def test_accelerate_fsdp_config_on_cpu_processes(tmp_path, data_cache, single_process):
    """configs/accelerate_fsdp_cpu.yaml as its comment says to run it (`--use_cpu true` in the recipe)."""
    single, single_dir = single_process("neural")
    output = tmp_path / "fsdp"
    result = launch(accelerate_launch("accelerate_fsdp_cpu.yaml"), recipe(output, data_cache, "neural", use_cpu=False), tmp_path,
                    "--use_cpu", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(results(output), single)
    assert_same_weights(output / "model", single_dir / "model")


def test_a_launch_that_would_train_two_copies_is_refused(tmp_path, data_cache):
    """The README's former command: the GPU FSDP config on a CPU machine, recipe without use_cpu. Before the check
    it exited 0 after two single-process trainings into one output_dir."""
    output = tmp_path / "out"
    result = launch(accelerate_launch("accelerate_fsdp.yaml", "--num_processes", "2"), recipe(output, data_cache, "cdape", use_cpu=False), tmp_path)
    assert result.returncode != 0
    assert "the launcher started 2 processes, but the Trainer would run 1" in result.stderr
    assert "--use_cpu true --fsdp true" in result.stderr
    assert not output.exists()
