"""The training pipeline: a few Trainer steps per variant and architecture, TrainingArguments features, resume,
two-process data parallelism through accelerate, and clear errors for bad recipes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import hf_neural_attention as hfna

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
train_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_script)


def tiny_recipe(output_dir, cache, architecture="gpt2", variant="dot", **overrides) -> dict:
    recipe = dict(
        architecture=architecture, attention_variant=variant, hidden_size=32, num_layers=2, num_heads=2,
        block_size=32, vocab_size=512, max_train_samples=48, max_eval_samples=8, cache_dir=cache,
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, use_cpu=True,
        dataloader_num_workers=0, skip_memory_metrics=False, include_num_input_tokens_seen=True,
    )
    if architecture == "llama":
        recipe["num_kv_heads"] = 1  # grouped-query attention
    if variant == "neural":
        recipe["attention_layers"] = "all"
    recipe.update(overrides)
    return recipe


def train(recipe: dict) -> dict:
    model_args, data_args, training_args = train_script.parse_dict_recipe(recipe)
    from hf_neural_attention.experiments.training import run

    return run(model_args, data_args, training_args)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["gpt2", "llama", "vit"])
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_few_trainer_steps(architecture, variant, tmp_path, data_cache):
    results = train(tiny_recipe(tmp_path, data_cache, architecture, variant))
    assert results["steps"] == 2 and math.isfinite(results["train_loss"])
    assert results["attention_variant"] == variant
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["parameters"] == results["parameters"] and written["loss_curve"]["train_loss"]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    model_dir = tmp_path / "model"
    assert {"model.safetensors", "config.json", "README.md", "modeling_variants.py"} <= {
        p.name for p in model_dir.iterdir()}
    if architecture == "vit":
        assert 0.0 <= results["validation_accuracy"] <= 1.0
    else:
        assert (model_dir / "tokenizer.json").exists()  # the locally trained BPE travels with the model
        assert math.isfinite(results["validation_perplexity"]) and results["validation_perplexity"] > 1
        assert math.isfinite(results["validation_perplexity_sliding"])
        assert results["train_tokens_per_second"] > 0
    card = (model_dir / "README.md").read_text()
    assert "perplexity" in card or "accuracy" in card


@pytest.mark.slow
def test_throughput_and_memory_are_trainers_own_metrics(tmp_path, data_cache):
    """train_tokens_per_second and train_memory_peak_mib come from Trainer's metrics, and are absent (None, shown as
    n/a) when the recipe turns those metrics off rather than estimated some other way."""
    on = train(tiny_recipe(tmp_path / "on", data_cache))
    assert on["train_tokens_per_second"] > 0 and on["train_memory_peak_mib"] >= 0
    off = train(tiny_recipe(tmp_path / "off", data_cache, skip_memory_metrics=True,
                            include_num_input_tokens_seen=False))
    assert off["train_tokens_per_second"] is None and off["train_memory_peak_mib"] is None


@pytest.mark.slow
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_bf16_and_gradient_checkpointing_through_training_arguments(variant, tmp_path, data_cache):
    results = train(tiny_recipe(tmp_path, data_cache, "gpt2", variant, bf16=True, activation_checkpointing=True))
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", hfna.VARIANTS)
def test_torch_compile_through_training_arguments(variant, tmp_path, data_cache):
    """Every variant traces under dynamo and AOT autograd (the aot_eager backend skips inductor's slow C++
    code generation); the default inductor backend runs end to end for one variant below."""
    results = train(tiny_recipe(tmp_path, data_cache, "gpt2", variant, torch_compile=True,
                                torch_compile_backend="aot_eager", max_steps=2))
    assert math.isfinite(results["train_loss"])


@pytest.mark.slow
def test_torch_compile_inductor(tmp_path, data_cache):
    results = train(tiny_recipe(tmp_path, data_cache, "gpt2", "cdape", torch_compile=True, max_steps=1))
    assert math.isfinite(results["train_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["neural", "cdape"])
def test_resume_continues_the_same_run(variant, tmp_path, data_cache):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-3,
                  attention_options={"bias": "kerple"} if variant == "cdape" else None)
    full = train(tiny_recipe(tmp_path / "full", data_cache, "gpt2", variant, **common))
    resumed = train(tiny_recipe(tmp_path / "resumed", data_cache, "gpt2", variant, **common,
                                resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3")))
    full_curve, resumed_curve = full["loss_curve"], resumed["loss_curve"]
    # The resumed run carries the first 3 logged steps over from the checkpoint and trains steps 4-6 itself.
    assert resumed_curve["train_steps"] == full_curve["train_steps"] == [1, 2, 3, 4, 5, 6]
    assert resumed_curve["train_loss"] == pytest.approx(full_curve["train_loss"], rel=1e-5, abs=1e-6)
    assert len(set(full_curve["train_loss"][3:])) == 3  # the losses do move, so equality means something
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
    # train_loss is the mean over all six steps, not over the three the resumed session ran
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    assert resumed["train_loss"] != pytest.approx(sum(full_curve["train_loss"][3:]) / 3, rel=1e-3)


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, data_cache, capsys):
    common = dict(max_steps=3, save_strategy="steps", save_steps=3)
    train(tiny_recipe(tmp_path / "dot", data_cache, "gpt2", "dot", **common))
    checkpoint = str(tmp_path / "dot" / "checkpoint-3")
    for variant, options in (("expressive", None), ("cdape", {"bias": "kerple"})):
        recipe_file = tmp_path / f"{variant}.yaml"
        recipe_file.write_text(yaml.safe_dump(tiny_recipe(
            tmp_path / variant, data_cache, "gpt2", variant, attention_options=options, max_steps=6,
            resume_from_checkpoint=checkpoint)))
        assert train_script.main([str(recipe_file)]) == 2
        error = capsys.readouterr().err
        assert f"attention_variant: checkpoint 'dot', recipe '{variant}'" in error, error
        assert not (tmp_path / variant / "results.json").exists()


# the variants with parameters of their own (DDP must reduce their gradients); ~20 s each
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["neural", "cdape"])
def test_two_process_data_parallel_with_accelerate(variant, tmp_path, data_cache):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "out", data_cache, "gpt2", variant, max_steps=3)))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost\n")
    # accelerate runs several CPU processes through MPI; the dev extra installs MPICH (mpirun) from PyPI.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mpirun_hostfile", str(hostfile), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(REPO / "scripts" / "train.py"), str(recipe)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["world_size"] == 2 and written["steps"] == 3 and written["distributed_type"] == "MULTI_CPU"
    assert math.isfinite(written["train_loss"])
    assert "find_unused_parameters" not in result.stderr  # DDP's warning on every rank (training.quiet_defaults)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"attention_kernel": 3}, r"unknown recipe key\(s\): .*attention_kernel"),
        ({"attention_variant": "cdape", "attention_options": {"kernel": 3}},
         r"Unknown option\(s\) \['kernel'\] for attention variant 'cdape'; valid options are"),
        ({"attention_variant": "flash"}, r"attention_variant='flash' is not valid; choose one of"),
        ({"dataset": "text", "data_files": "/nonexistent/*.txt"}, r"data file '/nonexistent/\*.txt' does not exist"),
        ({"architecture": "vit", "dataset": "imagefolder", "data_dir": "/nonexistent"},
         "needs an existing data_dir"),
        ({"architecture": "vit", "dataset": "stdlib-prose"}, "does not fit architecture 'vit'"),
        # yes/no and other strings are never read as booleans (YAML 1.2 keeps them strings)
        ({"bf16": "no"}, r"recipe field 'bf16' must be bool \(write true or false\); got 'no'"),
        ({"architecture": "llama", "use_rotary_embeddings": "no"}, r"'use_rotary_embeddings' must be bool"),
        ({"activation_checkpointing": "no"}, r"'activation_checkpointing' must be bool or null"),
        ({"hidden_size": "64"}, r"'hidden_size' must be int; got '64'"),
        ({"learning_rate": "fast"}, r"'learning_rate' must be float"),
        ({"attention_options": "kernel_size=3"}, r"'attention_options' must be dict or null"),
        # ranges, named by field
        ({"block_size": 0}, r"block_size must be an integer >= 2; got 0"),
        ({"hidden_size": -64}, r"hidden_size must be an integer >= 1; got -64"),
        ({"num_heads": 3}, r"hidden_size \(32\) must be a multiple of num_heads \(3\)"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\); got 1.5"),
        ({"eval_stride": 32}, r"eval_stride must be in \[1, block_size - 1\]"),
        ({"attention_layers": "first"}, r"layers must be None, \"all\" or comma-separated"),
        ({"attention_variant": "cdape", "attention_options": {"kernel_size": 4}}, "kernel_size must be odd"),
    ],
)
def test_bad_recipes_stop_with_a_message(overrides, message, tmp_path, data_cache, capsys):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "out", data_cache, **overrides)))
    assert train_script.main([str(recipe_file)]) == 2
    import re

    assert re.search(message, capsys.readouterr().err), message


def test_missing_recipe_and_command_line_overrides(tmp_path, data_cache, capsys):
    assert train_script.main([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml' does not exist" in capsys.readouterr().err
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "out", data_cache)))
    model_args, data_args, training_args = train_script.parse(
        [str(recipe_file), "--attention_variant", "cdape", "--attention_options={kernel_size: 5}", "--max_steps", "7"])
    assert model_args.attention_variant == "cdape" and model_args.attention_options == {"kernel_size": 5}
    assert training_args.max_steps == 7


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                                          if not p.name.startswith("accelerate_")))
def test_shipped_recipes_parse(recipe):
    # use_cpu: the GPU recipes ask for bf16, which TrainingArguments accepts on CPU only when told so
    model_args, data_args, training_args = train_script.parse([str(REPO / "configs" / recipe), "--use_cpu", "true"])
    from hf_neural_attention.experiments.training import validate_arguments

    validate_arguments(model_args, data_args)
    assert training_args.output_dir.startswith("outputs/")


def test_help_lists_every_recipe_field_with_its_help(capsys):
    assert train_script.main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--attention_variant", "--attention_options", "--block_size", "--learning_rate", "--bf16"):
        assert option in text, option
    assert "one of ('dot', 'expressive', 'neural', 'cdape')" in text


@pytest.mark.slow
@pytest.mark.parametrize("command", ["hfna-train", "hfna-retrofit"])
def test_console_scripts_are_installed(command):
    executable = Path(sys.executable).parent / command
    assert executable.exists(), f"{command} is not installed next to {sys.executable}"
    result = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


@pytest.mark.slow
def test_training_on_ones_own_single_text_file(tmp_path, data_cache):
    """The most common first step: one's own text in one file (one document) trains end to end."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} is about subject {i % 5}; it has a handful of words in it."
                                    for i in range(80)))
    results = train(tiny_recipe(tmp_path / "out", data_cache, dataset="text", data_files=str(corpus),
                                max_train_samples=None, max_eval_samples=None))
    assert math.isfinite(results["validation_perplexity"]) and math.isfinite(results["test_perplexity"])


@pytest.mark.slow
def test_vit_runs_save_an_image_processor_and_work_in_pipeline(tmp_path, data_cache):
    """An imagefolder of RGB images trains, and pipeline("image-classification") runs on the saved model folder."""
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    generator = torch.Generator().manual_seed(0)
    for label, colour in (("red", 0), ("blue", 2)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(12):
            pixels = (torch.rand(12, 12, 3, generator=generator) * 80).to(torch.uint8)
            pixels[..., colour] += 150
            Image.fromarray(pixels.numpy(), mode="RGB").save(tmp_path / "images" / label / f"{index}.png")
    recipe = tiny_recipe(tmp_path / "out", data_cache, "vit", "expressive", dataset="imagefolder",
                         data_dir=str(tmp_path / "images"), image_size=8, patch_size=4)
    for key in ("block_size", "vocab_size"):
        recipe.pop(key)
    train(recipe)
    model_dir = tmp_path / "out" / "model"
    processor = AutoImageProcessor.from_pretrained(model_dir)
    assert processor.size == {"height": 8, "width": 8} and list(processor.image_mean) == [0.5, 0.5, 0.5]
    classify = pipeline("image-classification", model=str(model_dir))
    predictions = classify(Image.open(tmp_path / "images" / "red" / "0.png"))
    assert {p["label"] for p in predictions} <= {"LABEL_0", "LABEL_1", "red", "blue"} and len(predictions) == 2


@pytest.mark.slow
def test_model_card_of_a_run_has_machine_readable_results_and_hyperparameters(tmp_path, data_cache):
    from huggingface_hub import ModelCard

    results = train(tiny_recipe(tmp_path / "out", data_cache, "gpt2", "expressive"))
    card = ModelCard.load(tmp_path / "out" / "model" / "README.md")
    values = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("validation", "perplexity")] == pytest.approx(results["validation_perplexity"])
    assert values[("test", "perplexity")] == pytest.approx(results["test_perplexity"])
    assert "| learning_rate |" in card.text and "| max_steps | 2 |" in card.text
