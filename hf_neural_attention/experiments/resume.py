"""Resuming a run from a Trainer checkpoint: the checkpoint must hold the recipe's model, and the reported training
loss covers the whole run."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint


def resume_checkpoint(training_args: TrainingArguments) -> Path | None:
    """The checkpoint folder a run resumes from (resume_from_checkpoint: a path, or true for the last one)."""
    resume = training_args.resume_from_checkpoint
    if resume in (None, False, "", "false", "False"):
        return None
    if resume is True or resume in ("true", "True"):
        last = get_last_checkpoint(training_args.output_dir)
        if last is None:
            raise FileNotFoundError(f"resume_from_checkpoint=true but {training_args.output_dir} holds no checkpoint")
        return Path(last)
    return Path(resume)


VARIANT_FIELDS = ("model_type", "attention_variant", "attention_variant_options", "attention_variant_layers")


def check_resume(training_args: TrainingArguments, model) -> int:
    """Refuses to resume a checkpoint of another model (architecture, variant, options, layers): the run would train
    a mix under the recipe's label, or stop on an optimizer error that names nothing. Returns the step resumed from."""
    checkpoint = resume_checkpoint(training_args)
    if checkpoint is None:
        return 0
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={str(checkpoint)!r} is not a checkpoint folder (no config.json)")
    saved = json.loads((checkpoint / "config.json").read_text())
    current = model.config.to_dict()
    differing = {field: (saved.get(field), current.get(field)) for field in VARIANT_FIELDS
                 if saved.get(field) != current.get(field)}
    if differing:
        details = "; ".join(f"{field}: checkpoint {old!r}, recipe {new!r}" for field, (old, new) in differing.items())
        raise ValueError(f"cannot resume from {checkpoint}: it holds another model ({details}). Resume with the "
                         "recipe it was trained with, or start a new run (init_from retrofits a checkpoint).")
    state = checkpoint / "trainer_state.json"
    return int(json.loads(state.read_text()).get("global_step", 0)) if state.is_file() else 0


def whole_run_train_loss(session_loss: float, state, resumed_from: int) -> float | None:
    """Mean training loss over every step of the run. Trainer reports the mean over the steps of this session only;
    after a resume the earlier steps' losses come from the logged history, which covers them exactly when the
    checkpoint step is a multiple of logging_steps. Otherwise None (no honest whole-run number)."""
    if resumed_from == 0:
        return session_loss
    logged = [(entry["step"], entry["loss"]) for entry in state.log_history
              if "loss" in entry and entry["step"] <= resumed_from]
    if not logged or logged[-1][0] != resumed_from:
        return None
    earlier_sum = sum(loss * (step - previous) for (step, loss), previous in zip(logged, [0] + [s for s, _ in logged]))
    steps = state.global_step
    return (earlier_sum + session_loss * (steps - resumed_from)) / steps


def tokens_seen_at_resume(training_args: TrainingArguments) -> int:
    """Trainer's input-token count stored in the checkpoint a run resumes from (0 for a fresh run), so the tokens of
    this session, and its throughput, can be told from the whole run's."""
    checkpoint = resume_checkpoint(training_args)
    if checkpoint is None:
        return 0
    return TrainerState.load_from_json(str(checkpoint / "trainer_state.json")).num_input_tokens_seen
