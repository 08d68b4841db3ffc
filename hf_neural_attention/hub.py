"""Model cards (README.md) for variant checkpoints, built with huggingface_hub's ModelCard and ModelCardData.

Installed-only: checkpoints do not ship this file. Importing it registers `write_model_card` as a save hook of the
variant model classes, so every `save_pretrained` (and `push_to_hub`) writes the card.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .modeling_variants import SAVE_HOOKS, primary_auto_class

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")

PAPERS = {
    "dot": ("dot-product attention", "1706.03762", "Vaswani et al., *Attention Is All You Need* (the control)",
            "softmax(q . k / sqrt(d_h))."),
    "expressive": ("Expressive Attention", "2407.18601",
                   "Gros, *Reorganizing attention-space geometry with expressive attention*",
                   "weights f(q . k) / sum_keys f(q . k) with f(s) = s^2 / (1 + s^2), large for parallel and "
                   "antiparallel query/key pairs."),
    "neural": ("Neural Attention", "2502.17206",
               "DiGiugno & Mahmood, *Neural Attention: A Novel Mechanism for Enhanced Expressive Power in "
               "Transformer Models*",
               "a small MLP scores every (query, key) pair instead of the dot product."),
    "cdape": ("CDAPE (DAPE V2)", "2410.04798",
              "Zheng et al., *DAPE V2: Process Attention Score as Feature Map for Length Extrapolation* (ACL 2025)",
              "a small 1 x k convolution over the attention score map, heads as channels, before the softmax."),
}

AUTO_CLASS_PIPELINES = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForImageClassification": "image-classification",
    "AutoModel": "feature-extraction",
}


def build_model_card(
    model: Any,
    repo_id: str | None = None,
    datasets: list[str] | None = None,
    metrics: list[str] | None = None,
    results: str | None = None,
    training_data: str | None = None,
    eval_results: list | None = None,
) -> ModelCard:
    """The card of a variant checkpoint. `eval_results` (huggingface_hub EvalResult objects) become the card's
    machine-readable `model-index`; `results` and `training_data` are markdown for the text."""
    config = model.config
    variant = config.attention_variant
    title, arxiv_id, paper, summary = PAPERS[variant]
    auto_class = primary_auto_class(type(model))
    base_model = getattr(config, "retrofitted_from", None)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=AUTO_CLASS_PIPELINES.get(auto_class),
        tags=["hf-neural-attention", f"attention-variant-{variant}", f"arxiv:{arxiv_id}", "custom_code"],
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        datasets=datasets,
        metrics=metrics,
        eval_results=eval_results,
        # model-index needs a model name; the card's title is set below
        model_name=(repo_id.split("/")[-1] if repo_id else f"{type(model).__name__}-{variant}") if eval_results
        else None,
    )
    architecture = type(model).__name__.removeprefix("Variant")
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=repo_id.split("/")[-1] if repo_id else f"{architecture} with {title}",
        architecture=architecture,
        variant=variant,
        variant_title=title,
        variant_summary=summary,
        paper=f"{paper}, [arXiv {arxiv_id}](https://arxiv.org/abs/{arxiv_id})",
        options=config.attention_variant_options or {},
        layers=config.attention_variant_layers,
        base_model=base_model,
        auto_class=auto_class,
        repo_id=repo_id or "path/to/this/checkpoint",
        results=results,
        training_data=training_data,
    )


def write_model_card(model: Any, save_directory: str | os.PathLike, **fields: Any) -> Path:
    """Writes README.md into a saved checkpoint folder and returns its path."""
    path = Path(save_directory) / "README.md"
    build_model_card(model, **fields).save(path)
    return path


if write_model_card not in SAVE_HOOKS:
    SAVE_HOOKS.append(write_model_card)
