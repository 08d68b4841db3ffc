"""Train and evaluate a GPT-2, Llama or ViT whose only difference is the attention variant, with the stock Trainer.

`run(model_args, data_args, training_args)` builds the data (see data.py), the model (a Variant* class, from
scratch or retrofitted from `init_from`), trains with `transformers.Trainer`, evaluates, and writes into
`training_args.output_dir`: results.json, loss_curve.png and model/ (weights, code, tokenizer, model card).
`scripts/train.py` drives it from YAML/JSON recipes through HfArgumentParser.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from . import data as data_lib
from .. import (
    VariantGPT2Config,
    VariantGPT2LMHeadModel,
    VariantLlamaConfig,
    VariantLlamaForCausalLM,
    VariantViTConfig,
    VariantViTForImageClassification,
    parse_layer_spec,
)
from ..hub import write_model_card
from .metrics import compute_accuracy_from_eval_prediction, sliding_window_perplexity
from .report import markdown_table, plot_loss_curves
from .recipes import (  # noqa: F401 (re-exported: the recipe API is used through this module too)
    ARCHITECTURES,
    DEFAULT_CACHE,
    DataArguments,
    ModelArguments,
    check_recipe_types,
    dataset_name,
    validate_arguments,
)
from .launch import (ConfigInShardedCheckpoints, check_training_launch, saves_sharded_checkpoints,
                     shard_on_cpu_processes)
from .resume import check_resume, tokens_seen_at_resume, whole_run_train_loss
from .scorer_health import NeuralScorerMonitor
from ..neural import NeuralAttention


@dataclass
class PreparedData:
    train: Any
    validation: Any
    test: Any
    tokenizer: Any = None  # the tokenizer (text) or the image processor (ViT): Trainer's processing_class, saved
    num_labels: int | None = None
    num_channels: int | None = None
    image_size: int | None = None
    validation_tokens: Any = None


def prepare_data(model_args: ModelArguments, data_args: DataArguments) -> PreparedData:
    name = dataset_name(model_args, data_args)
    if model_args.architecture == "vit":
        dataset, num_labels, channels = data_lib.load_image_dataset(
            name, data_dir=data_args.data_dir, cache_dir=data_args.cache_dir, image_size=model_args.image_size)
        size = int(dataset["train"][0]["pixel_values"].shape[-1])
        return PreparedData(*_limit(dataset, data_args), num_labels=num_labels, num_channels=channels,
                            image_size=size, tokenizer=data_lib.image_processor(size, channels))

    raw = data_lib.load_text_dataset(name, data_files=data_args.data_files, cache_dir=data_args.cache_dir)
    if data_args.tokenizer_name:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(data_args.tokenizer_name)
    else:
        tokenizer_dir = Path(data_args.cache_dir) / "tokenizers" / f"{name}-bpe{data_args.vocab_size}"
        if name == "text":  # a user's files: key the cache by their names too
            digest = hashlib.sha256(str(data_args.data_files).encode()).hexdigest()[:12]
            tokenizer_dir = tokenizer_dir.with_name(f"{tokenizer_dir.name}-{digest}")
        tokenizer = data_lib.train_bpe_tokenizer(raw["train"], data_args.vocab_size, save_dir=tokenizer_dir)
    tokenized = data_lib.tokenize_documents(raw, tokenizer)
    blocks = data_lib.pack_blocks(tokenized, data_args.block_size).with_format("torch")
    train, validation, test = _limit(blocks, data_args)
    return PreparedData(train, validation, test, tokenizer=tokenizer,
                        validation_tokens=data_lib.concatenated_tokens(tokenized["validation"]))


def _limit(dataset, data_args: DataArguments):
    train, validation, test = dataset["train"], dataset["validation"], dataset["test"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        validation = validation.select(range(min(len(validation), data_args.max_eval_samples)))
        test = test.select(range(min(len(test), data_args.max_eval_samples)))
    return train, validation, test


def build_model(model_args: ModelArguments, data_args: DataArguments, prepared: PreparedData):
    """A Variant* model from scratch (sizes from model_args), or retrofitted from `init_from`."""
    variant_fields = dict(
        attention_variant=model_args.attention_variant,
        attention_variant_options=dict(model_args.attention_options or {}),
        attention_variant_layers=parse_layer_spec(model_args.attention_layers),
    )
    model_class = {"gpt2": VariantGPT2LMHeadModel, "llama": VariantLlamaForCausalLM,
                   "vit": VariantViTForImageClassification}[model_args.architecture]
    if model_args.init_from is not None:
        extra = {"use_rotary_embeddings": model_args.use_rotary_embeddings} if model_args.architecture == "llama" else {}
        return model_class.from_pretrained(model_args.init_from, **variant_fields, **extra)

    intermediate = model_args.intermediate_size or 4 * model_args.hidden_size
    if model_args.architecture == "gpt2":
        tokenizer = prepared.tokenizer
        config = VariantGPT2Config(
            vocab_size=len(tokenizer), n_positions=model_args.max_position_embeddings, n_embd=model_args.hidden_size,
            n_layer=model_args.num_layers, n_head=model_args.num_heads, n_inner=intermediate,
            resid_pdrop=model_args.dropout, embd_pdrop=model_args.dropout, attn_pdrop=model_args.dropout,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **variant_fields)
    elif model_args.architecture == "llama":
        tokenizer = prepared.tokenizer
        config = VariantLlamaConfig(
            vocab_size=len(tokenizer), hidden_size=model_args.hidden_size, intermediate_size=intermediate,
            num_hidden_layers=model_args.num_layers, num_attention_heads=model_args.num_heads,
            num_key_value_heads=model_args.num_kv_heads or model_args.num_heads,
            max_position_embeddings=model_args.max_position_embeddings, attention_dropout=model_args.dropout,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
            use_rotary_embeddings=model_args.use_rotary_embeddings, **variant_fields)
    else:
        config = VariantViTConfig(
            image_size=prepared.image_size, patch_size=model_args.patch_size, num_channels=prepared.num_channels,
            hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_layers,
            num_attention_heads=model_args.num_heads, intermediate_size=intermediate, num_labels=prepared.num_labels,
            hidden_dropout_prob=model_args.dropout, attention_probs_dropout_prob=model_args.dropout, **variant_fields)
    return model_class(config)


def training_memory_peak_mib(train_metrics: dict) -> float | None:
    """Trainer's own memory metrics (recipe `skip_memory_metrics: false`): the peak during training above the memory
    in use when it started, on the GPU where one trained, else the process' CPU memory; None where they are off."""
    for device in ("gpu", "cpu"):
        allocated = train_metrics.get(f"train_mem_{device}_alloc_delta")
        peaked = train_metrics.get(f"train_mem_{device}_peaked_delta")
        if allocated is not None and peaked is not None:
            return (allocated + peaked) / 2**20  # bytes
    return None


def session_tokens_per_second(training_args: TrainingArguments, trainer: Trainer, train_metrics: dict) -> float | None:
    """Trainer's input-token count (recipe `include_num_input_tokens_seen: true`) over its train_runtime, for the
    tokens of this session (a resumed run's earlier tokens excluded); None where the count is off."""
    if training_args.include_num_input_tokens_seen in ("no", False):
        return None
    tokens = trainer.state.num_input_tokens_seen - tokens_seen_at_resume(training_args)
    return tokens / train_metrics["train_runtime"]


def loss_curve(log_history: list[dict]) -> dict[str, list]:
    train = [(row["step"], row["loss"]) for row in log_history if "loss" in row]
    evaluation = [(row["step"], row["eval_loss"]) for row in log_history if "eval_loss" in row]
    return {"train_steps": [s for s, _ in train], "train_loss": [l for _, l in train],
            "eval_steps": [s for s, _ in evaluation], "eval_loss": [l for _, l in evaluation]}


def train_model(model, training_args: TrainingArguments, train_dataset, eval_dataset=None, *,
                data_collator=default_data_collator, compute_metrics=None, processing_class=None):
    """The one training entry point: the stock Trainer on a ready model, or on a model factory (a callable that
    returns one), which is called after `set_seed(training_args.seed)` so that the seed fixes the initial weights.
    Returns (trainer, train output, seconds); `trainer.model` is the trained model. `run` builds model and data from
    a recipe and calls it; the reproductions call it with their own models (through harness.train_built_arm)."""
    if callable(model) and not isinstance(model, torch.nn.Module):
        set_seed(training_args.seed)
        model = model()
    # a model with neural scorers gets the monitor that warns when one dies (scorer_health.py)
    callbacks = [NeuralScorerMonitor()] if any(isinstance(m, NeuralAttention) for m in model.modules()) else None
    quiet_defaults(training_args)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=data_collator, compute_metrics=compute_metrics, processing_class=processing_class,
                      callbacks=callbacks)
    shard_on_cpu_processes(trainer)  # FSDP on CPU processes (launch.py); nothing elsewhere
    if saves_sharded_checkpoints(trainer):
        trainer.add_callback(ConfigInShardedCheckpoints())
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return trainer, train_output, time.perf_counter() - started


def quiet_defaults(training_args: TrainingArguments) -> None:
    """Settings the Trainer leaves to defaults that warn on every run of these models: pinned memory only where a
    GPU takes the batches (on CPUs it does nothing, and torch warns on every run), and DDP without the search for unused
    parameters (every parameter of every variant gets a gradient, tests/test_training_setup.py; the search costs a
    graph traversal per step and warns on every rank; a recipe that sets ddp_find_unused_parameters keeps it)."""
    if training_args.device.type != "cuda":
        training_args.dataloader_pin_memory = False
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False


def run(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
        launch_arguments: list[str] | None = None) -> dict:
    """`launch_arguments`: the command's recipe and overrides, which the launch check uses to spell out the command
    that works when the launch and the training disagree (launch.py)."""
    validate_arguments(model_args, data_args)
    check_training_launch(training_args, launch_arguments)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="building the data"):
        prepared = prepare_data(model_args, data_args)
    set_seed(training_args.seed)  # the same initial weights whatever the data preparation consumed
    model = build_model(model_args, data_args, prepared)
    is_image = model_args.architecture == "vit"

    resumed_from = check_resume(training_args, model)
    model_class = type(model)
    trainer, train_output, train_seconds = train_model(
        model, training_args, prepared.train, prepared.validation,
        compute_metrics=compute_accuracy_from_eval_prediction if is_image else None,
        processing_class=prepared.tokenizer)
    evaluation = trainer.evaluate()
    test = trainer.evaluate(prepared.test, metric_key_prefix="test")
    # every rank gathers a sharded model; rank 0 scores and saves an unsharded copy
    final_model = unsharded_copy(model, model_class) if trainer.is_fsdp_enabled else model

    results: dict[str, Any] = {
        "architecture": model_args.architecture,
        "attention_variant": model.config.attention_variant,
        "attention_options": model.config.attention_variant_options,
        "attention_layers": model.config.attention_variant_layers,
        "dataset": dataset_name(model_args, data_args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "variant_parameters": sum(p.numel() for n, p in model.named_parameters() if ".attention_variant." in n),
        "seed": training_args.seed,
        "steps": trainer.state.global_step,
        "train_loss": whole_run_train_loss(train_output.training_loss, trainer.state, resumed_from),
        "train_seconds": train_seconds,
        "train_memory_peak_mib": training_memory_peak_mib(train_output.metrics),
        "world_size": training_args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],  # NO, MULTI_CPU, FSDP, ...
        # this process' share of the parameter elements: all of them unless FSDP shards them
        "rank0_parameter_elements": sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                                        for p in model.parameters()),
        **{key: value for key, value in evaluation.items() if isinstance(value, (int, float))},
        **{key: value for key, value in test.items() if isinstance(value, (int, float))},
    }
    samples_per_second = train_output.metrics.get("train_samples_per_second")
    if is_image:
        results["validation_accuracy"] = evaluation.get("eval_accuracy")
        results["test_accuracy"] = test.get("test_accuracy")
        results["train_images_per_second"] = samples_per_second
    else:
        results["validation_perplexity"] = math.exp(evaluation["eval_loss"])
        results["test_perplexity"] = math.exp(test["test_loss"])
        results["train_tokens_per_second"] = session_tokens_per_second(training_args, trainer, train_output.metrics)
        stride = data_args.eval_stride or max(1, data_args.block_size // 2)
        if trainer.is_world_process_zero():
            sliding = sliding_window_perplexity(final_model, prepared.validation_tokens, data_args.block_size, stride,
                                                max_tokens=None if data_args.max_eval_samples is None else
                                                data_args.max_eval_samples * data_args.block_size)
            results["validation_perplexity_sliding"] = sliding["perplexity"]
            results["sliding_stride"] = stride

    results["loss_curve"] = loss_curve(trainer.state.log_history)
    if trainer.is_world_process_zero():
        write_outputs(trainer, final_model, prepared, results, model_args, data_args, training_args)
    return results


def unsharded_copy(model, model_class):
    """An FSDP-sharded model's full weights in a plain `model_class` model on rank 0 (None on the other ranks, which
    take part in the gather): what the final scoring and `from_pretrained` need, whatever the state-dict type of the
    checkpoints (a SHARDED_STATE_DICT run saves no full weights of its own)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() != 0:
        return None
    copy = model_class(model.config)
    copy.load_state_dict(full)
    return copy.eval()


def write_outputs(trainer, model, prepared, results, model_args, data_args, training_args) -> None:
    output = Path(training_args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    label = f"{model_args.architecture}-{model.config.attention_variant}"
    plot_loss_curves({label: results["loss_curve"]}, output / "loss_curve.png", f"{label} on {results['dataset']}")
    model_dir = output / "model"
    if trainer.is_fsdp_enabled:  # `model` is the unsharded copy; Trainer's save would gather on every rank
        model.save_pretrained(str(model_dir))
        if prepared.tokenizer is not None:
            prepared.tokenizer.save_pretrained(str(model_dir))
    else:
        trainer.save_model(str(model_dir))  # weights, config, code, model card, tokenizer
    metric_name = "accuracy" if model_args.architecture == "vit" else "perplexity"
    headline = {key: value for key, value in results.items()
                if key.startswith(("validation_", "test_")) and isinstance(value, float)}
    table = markdown_table(["metric", "value"], [(key, f"{value:.4f}") for key, value in headline.items()])
    task = ("image-classification", "Image Classification") if model_args.architecture == "vit" else (
        "text-generation", "Text Generation")
    eval_results = [
        EvalResult(task_type=task[0], task_name=task[1], dataset_type=results["dataset"],
                   dataset_name=results["dataset"], dataset_split=key.split("_", 1)[0], metric_type=metric_name,
                   metric_name=key.replace("_", " "), metric_value=value)
        for key, value in headline.items() if key.endswith(("_perplexity", "_accuracy"))]
    hyperparameters = {key: getattr(training_args, key) for key in (
        "learning_rate", "max_steps", "per_device_train_batch_size", "lr_scheduler_type", "warmup_steps",
        "weight_decay", "adam_beta2", "max_grad_norm", "seed", "bf16")}
    table += "\n\nTraining hyper-parameters:\n\n" + markdown_table(["hyper-parameter", "value"],
                                                                   hyperparameters.items())
    write_model_card(model, model_dir, datasets=[results["dataset"]], metrics=[metric_name], results=table,
                     training_data=f"`{results['dataset']}` (see hf_neural_attention/experiments/data.py), "
                                   f"{results['steps']} steps, seed {results['seed']}.", eval_results=eval_results)
    arguments = {"model": asdict(model_args), "data": asdict(data_args),
                 "training": {k: v for k, v in training_args.to_dict().items() if _is_json(v)}}
    (output / "results.json").write_text(json.dumps({**results, "arguments": arguments}, indent=2, default=str))


def _is_json(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
