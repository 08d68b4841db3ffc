"""The launch check of hfna-train (experiments/launch.py): every way a launch and the training it would run can
disagree stops with the mismatch and a command that works; launches that agree pass. The environment is faked (the
variables torchrun, accelerate launch and mpirun set); the end-to-end refusal of a real launch is in
test_distributed.py."""

from __future__ import annotations

import pytest

from hf_neural_attention.experiments.launch import LaunchError, PlannedTraining, check_launch, launched_processes

TORCHRUN_2 = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0", "LOCAL_WORLD_SIZE": "2"}
# what `accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 2` sets (measured here)
ACCELERATE_FSDP_BF16_2 = {**TORCHRUN_2, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                          "ACCELERATE_MIXED_PRECISION": "bf16", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}


def plan(**fields) -> PlannedTraining:
    defaults = dict(world_size=2, use_cpu=True, fsdp=False, fsdp_version=None, deepspeed=False, precision="no",
                    cuda=False)
    return PlannedTraining(**{**defaults, **fields})


def refusal(environ, planned, arguments=("recipe.yaml",)) -> str:
    with pytest.raises(LaunchError) as caught:
        check_launch(environ, planned, list(arguments))
    return str(caught.value)


def test_process_count_comes_from_any_launcher():
    assert launched_processes({}) == 1
    assert launched_processes(TORCHRUN_2) == 2
    assert launched_processes({"PMI_SIZE": "3"}) == 3  # MPICH's mpirun (accelerate launch --cpu)
    assert launched_processes({"OMPI_COMM_WORLD_SIZE": "4"}) == 4


def test_processes_that_would_each_train_alone_are_refused():
    """The README's old command on a CPU machine: 2 processes, no GPU, use_cpu false: two single-process runs into
    one output_dir."""
    message = refusal(TORCHRUN_2, plan(world_size=1, use_cpu=False))
    assert "the launcher started 2 processes, but the Trainer would run 1" in message
    assert "no GPU is visible and use_cpu is false" in message and "same output_dir" in message
    assert "torchrun --nproc_per_node 2 -m hf_neural_attention.commands.train recipe.yaml --use_cpu true" in message
    # an mpirun launch counts the same way
    assert "started 3 processes" in refusal({"PMI_SIZE": "3"}, plan(world_size=1))


def test_an_fsdp_launch_that_would_train_alone_names_the_fsdp_command():
    message = refusal(ACCELERATE_FSDP_BF16_2, plan(world_size=1, use_cpu=False, precision="bf16"))
    assert "would run 1" in message
    assert "--use_cpu true --fsdp true" in message and "configs/accelerate_fsdp_cpu.yaml" in message


@pytest.mark.parametrize("recipe_fsdp", [True, False])
def test_fsdp_with_one_process_is_refused(recipe_fsdp):
    environ = {} if recipe_fsdp else {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    message = refusal(environ, plan(world_size=1, fsdp=recipe_fsdp, fsdp_version=2 if recipe_fsdp else None))
    assert "only one process trains, so nothing would be sharded" in message
    assert ("the recipe's fsdp" if recipe_fsdp else "ACCELERATE_USE_FSDP") in message
    assert "torchrun --nproc_per_node 2" in message and "--fsdp true" in message


def test_fsdp1_on_cpu_processes_is_refused():
    message = refusal({**TORCHRUN_2, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, plan())
    assert "FSDP version 1" in message and "only FSDP2" in message
    assert "FSDP version 1" in refusal(TORCHRUN_2, plan(fsdp=True, fsdp_version=1))


@pytest.mark.parametrize("recipe_deepspeed", [True, False])
def test_deepspeed_on_cpu_processes_is_refused(recipe_deepspeed):
    """accelerate drops DeepSpeed on CPU processes and trains plain DDP."""
    environ = TORCHRUN_2 if recipe_deepspeed else {**TORCHRUN_2, "ACCELERATE_USE_DEEPSPEED": "true"}
    message = refusal(environ, plan(deepspeed=recipe_deepspeed))
    assert "accelerate does not apply DeepSpeed" in message and "--fsdp true" in message


@pytest.mark.parametrize("launch,recipe", [("bf16", "no"), ("fp16", "no"), ("bf16", "fp16"), ("fp16", "bf16")])
def test_mixed_precision_that_differs_from_the_recipe_is_refused(launch, recipe):
    message = refusal({**TORCHRUN_2, "ACCELERATE_MIXED_PRECISION": launch}, plan(precision=recipe))
    assert f"mixed precision is {launch}" in message
    assert f"--{launch} true" in message and f"--mixed_precision {recipe}" in message


def test_fsdp_config_with_bf16_and_an_fp32_recipe_is_refused():
    """configs/accelerate_fsdp.yaml (bf16) with an fp32 recipe on CPU processes: the processes do form a group and
    FSDP shards, but the launch's bf16 is not the recipe's precision."""
    message = refusal(ACCELERATE_FSDP_BF16_2, plan())
    assert "mixed precision is bf16" in message


@pytest.mark.parametrize("environ,planned", [
    ({}, plan(world_size=1)),  # plain hfna-train
    (TORCHRUN_2, plan()),  # DDP on CPU processes
    ({**TORCHRUN_2, "ACCELERATE_MIXED_PRECISION": "no"}, plan(precision="bf16")),  # launch leaves precision to us
    (TORCHRUN_2, plan(fsdp=True, fsdp_version=2)),  # Trainer's FSDP on CPU processes
    ({**ACCELERATE_FSDP_BF16_2, "ACCELERATE_MIXED_PRECISION": "no"}, plan()),  # configs/accelerate_fsdp_cpu.yaml
    ({**ACCELERATE_FSDP_BF16_2, "FSDP_VERSION": "1"}, plan(use_cpu=False, cuda=True, precision="bf16")),  # GPUs
    ({**TORCHRUN_2, "ACCELERATE_USE_DEEPSPEED": "true"}, plan(use_cpu=False, cuda=True)),  # DeepSpeed on GPUs
    ({"WORLD_SIZE": "8"}, plan(world_size=8, use_cpu=False, cuda=True, deepspeed=True, precision="bf16")),
])
def test_launches_that_agree_with_the_training_pass(environ, planned):
    check_launch(environ, planned, ["recipe.yaml"])


def test_deepspeed_on_gpus_still_needs_every_process_in_the_group():
    message = refusal({**TORCHRUN_2, "ACCELERATE_USE_DEEPSPEED": "true"},
                      plan(world_size=1, use_cpu=False, cuda=True, deepspeed=True))
    assert "would run 1" in message
