"""Multi-process launches: a check that the launch the environment describes is the training the Trainer will run,
and FSDP on CPU processes.

`check_launch` runs before training. A launcher (torchrun, `accelerate launch`, mpirun) says in the environment how
many processes it started and which engine it configured (accelerate's `ACCELERATE_USE_FSDP`,
`ACCELERATE_USE_DEEPSPEED`, `ACCELERATE_MIXED_PRECISION`); TrainingArguments decide what actually runs. Where they
disagree the Trainer does not say so: N processes that each train alone into one output_dir, an FSDP or DeepSpeed
config that quietly becomes plain DDP, a launch config's bf16 that the recipe (and so results.json and the model card)
does not state. The check stops with the mismatch and the command that works.

`shard_on_cpu_processes` makes FSDP real on CPU processes: accelerate's FSDP2 preparation (`fully_shard` per
transformer block) runs over gloo, but accelerate only turns FSDP on for accelerator devices; on CPU processes
(MULTI_CPU) it keeps the plugin aside and the Trainer trains plain DDP. The function switches the accelerator's state
to FSDP with that plugin, which is what accelerate does on GPUs, so the Trainer shards, saves and resumes through its
own FSDP code paths.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Mapping

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# Variables through which launchers state the number of processes (torchrun and accelerate: WORLD_SIZE; MPICH,
# Open MPI and MVAPICH under mpirun, which `accelerate launch --cpu` uses).
PROCESS_COUNT_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
MODULE_COMMAND = "-m hf_neural_attention.commands.train"
CPU_FSDP_CONFIG = "configs/accelerate_fsdp_cpu.yaml"


class LaunchError(ValueError):
    """The launch and the training it would run disagree; the message names the mismatch and a command that works."""


@dataclass
class PlannedTraining:
    """What TrainingArguments will run, as far as the launch check needs it."""
    world_size: int
    use_cpu: bool
    fsdp: bool
    fsdp_version: int | None
    deepspeed: bool
    precision: str  # "bf16", "fp16" or "no" (the recipe's bf16/fp16 flags)
    cuda: bool


def launched_processes(environ: Mapping[str, str]) -> int:
    """The number of processes the launcher says it started (1 when none says so)."""
    counts = [int(environ[name]) for name in PROCESS_COUNT_VARIABLES if str(environ.get(name, "")).isdigit()]
    return max(counts, default=1)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return str(environ.get(name, "false")).lower() in ("1", "true", "yes")


def planned_training(training_args) -> PlannedTraining:
    fsdp_args = getattr(training_args, "fsdp_plugin_args", None) or {}
    return PlannedTraining(
        world_size=training_args.world_size,
        use_cpu=bool(training_args.use_cpu) or _flag(os.environ, "ACCELERATE_USE_CPU"),
        fsdp=bool(training_args.fsdp),
        fsdp_version=fsdp_args.get("fsdp_version"),
        deepspeed=bool(training_args.deepspeed),
        precision="bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no",
        cuda=torch.cuda.is_available())


def check_launch(environ: Mapping[str, str], plan: PlannedTraining, arguments: list[str] | None = None) -> None:
    """Raises LaunchError when the launch in `environ` and the planned training disagree (see the module docstring).
    `arguments` are the command's recipe and overrides, used to spell out the command that works."""
    processes = launched_processes(environ)
    cpu = plan.use_cpu or not plan.cuda
    fsdp_launch = _flag(environ, "ACCELERATE_USE_FSDP")
    deepspeed_launch = _flag(environ, "ACCELERATE_USE_DEEPSPEED")
    recipe = shlex.join(arguments) if arguments else "RECIPE.yaml"
    torchrun = f"torchrun --nproc_per_node {max(processes, 2)} {MODULE_COMMAND} {recipe}"
    use_cpu = " --use_cpu true" if cpu and not plan.use_cpu else ""
    fsdp_command = (f"{torchrun}{' --use_cpu true' if cpu else ''} --fsdp true"
                    + (f" (or accelerate launch --config_file {CPU_FSDP_CONFIG} {MODULE_COMMAND} {recipe} --use_cpu true)"
                       if cpu else ""))
    working_command = fsdp_command if (plan.fsdp or fsdp_launch) else f"{torchrun}{use_cpu}"

    if processes > 1 and plan.world_size != processes:
        reason = ("no GPU is visible and use_cpu is false, so accelerate sets up no process group"
                  if not plan.cuda and not plan.use_cpu else "the Trainer set up no process group of that size")
        raise LaunchError(
            f"the launcher started {processes} processes, but the Trainer would run {plan.world_size} "
            f"(world_size {plan.world_size}): {reason}. Each process would train its own copy into the same "
            f"output_dir. {'On CPU processes add --use_cpu true: ' if use_cpu else 'A command that works: '}"
            f"{working_command}")

    if plan.fsdp or fsdp_launch:
        source = "the recipe's fsdp" if plan.fsdp else "the launch config's FSDP (ACCELERATE_USE_FSDP)"
        if plan.world_size < 2:
            raise LaunchError(
                f"{source} is set, but only one process trains, so nothing would be sharded. Launch several "
                f"processes: {working_command}")
        version = plan.fsdp_version if plan.fsdp else int(environ.get("FSDP_VERSION", "1") or 1)
        if cpu and version != 2:
            raise LaunchError(
                f"{source} asks for FSDP version {version}; on CPU processes only FSDP2 (fsdp_version 2) shards "
                f"(over gloo). Set fsdp_version 2: {fsdp_command}")

    if (plan.deepspeed or deepspeed_launch) and cpu:
        source = "the recipe's deepspeed" if plan.deepspeed else "the launch config's DeepSpeed (ACCELERATE_USE_DEEPSPEED)"
        raise LaunchError(
            f"{source} is set on CPU processes, where accelerate does not apply DeepSpeed (the processes would train "
            f"plain DDP). Shard with FSDP on CPU processes instead: {fsdp_command}")

    launch_precision = str(environ.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if launch_precision not in ("no", "") and launch_precision != plan.precision:
        recipe_says = "fp32 (bf16 and fp16 false)" if plan.precision == "no" else plan.precision
        fix = "--bf16 true" if launch_precision == "bf16" else "--fp16 true" if launch_precision == "fp16" else ""
        raise LaunchError(
            f"the launch config's mixed precision is {launch_precision} (ACCELERATE_MIXED_PRECISION) but the recipe "
            f"trains in {recipe_says}, and results.json and the model card record the recipe's. Say the same in "
            f"both: add {fix or 'the matching flag'} to the recipe, or launch with --mixed_precision {plan.precision}.")


def check_training_launch(training_args, arguments: list[str] | None = None) -> None:
    check_launch(os.environ, planned_training(training_args), arguments)


def shard_on_cpu_processes(trainer) -> bool:
    """Turns FSDP on for a Trainer whose processes run on CPUs (see the module docstring). Returns whether it did.
    The plugin is Trainer's (recipe `fsdp`/`fsdp_config`) or, when the recipe has none, the launch config's
    (accelerate's FSDP_* variables), as accelerate would take it on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    wanted = trainer.args.fsdp_plugin_args is not None or _flag(os.environ, "ACCELERATE_USE_FSDP")
    if not wanted or state.distributed_type != DistributedType.MULTI_CPU or trainer.is_fsdp_enabled:
        return False
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None:
        plugin = (FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
                  if trainer.args.fsdp_plugin_args is not None else FullyShardedDataParallelPlugin())
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # The accelerator state is shared (AcceleratorState over PartialState): both must say FSDP, or a later
    # AcceleratorState() would copy MULTI_CPU back from PartialState.
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    trainer.place_model_on_device = False
    if plugin.activation_checkpointing and trainer.args.activation_checkpointing:
        raise LaunchError("fsdp_config activation_checkpointing and the activation_checkpointing training argument "
                          "are both set; keep FSDP's (fsdp_config) one")
    return True


class ConfigInShardedCheckpoints(TrainerCallback):
    """Writes the model's config.json into each checkpoint of an FSDP run with SHARDED_STATE_DICT, where the Trainer
    saves only the weight and optimizer shards: resuming checks the checkpoint's config (resume.py), and the folder
    says which model it holds."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            model.config.save_pretrained(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


def saves_sharded_checkpoints(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return bool(trainer.is_fsdp_enabled and plugin is not None and "SHARDED" in str(plugin.state_dict_type))
