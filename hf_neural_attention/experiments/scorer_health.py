"""Whether a neural attention scorer still depends on its inputs, and a Trainer callback that warns when it stops.

The paper's MLP for d_h = 64 is 4 -> 2 -> 1 -> 1: one ReLU unit before the output. A ReLU unit whose incoming
weights and bias are all <= 0 is dead for every input once its inputs are themselves ReLU outputs (>= 0): from the
second hidden layer on, that is a certificate read from the weights alone. When every unit of such a layer is dead,
the scorer outputs its last bias for every (query, key) pair, the layer's attention is uniform over the visible keys,
and no gradient reaches the MLP again. `activation="leaky_relu"` cannot die this way; `init="alive"` (positive biases)
is never dead at init.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from ..neural import NeuralAttention

logger = logging.getLogger(__name__)


def dead_groups(scorer: NeuralAttention) -> list[int]:
    """Weight groups (0 for a shared MLP, else heads) whose scorer is constant: some hidden layer after the first
    has every unit dead (ReLU with incoming weights and bias all <= 0)."""
    if scorer.activation != "relu":
        return []
    dead = torch.zeros(scorer.mlp_weights[0].shape[0], dtype=torch.bool)
    for weight, bias in zip(scorer.mlp_weights[1:-1], scorer.mlp_biases[1:-1]):  # [G, out, in], [G, out]
        weight, bias = _whole(weight), _whole(bias)
        unit_dead = (weight <= 0).all(dim=-1) & (bias <= 0)  # [G, out]
        dead |= unit_dead.all(dim=-1).cpu()
    return [int(group) for group in dead.nonzero().flatten()]


def _whole(parameter: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter that FSDP2 shards (a DTensor; every rank gathers, as every rank runs the
    Trainer's callbacks), or the parameter itself."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def dead_scorers(model: torch.nn.Module) -> dict[str, list[int]]:
    """{attention module name: dead weight groups} for every neural scorer of the model that has any."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, NeuralAttention):
            groups = dead_groups(module)
            if groups:
                found[name.removesuffix(".attention_variant")] = groups
    return found


class NeuralScorerMonitor(TrainerCallback):
    """Warns (once per layer) when a neural scorer's output no longer depends on its inputs: at the start of training
    and every `check_every` steps. The check reads the weights only, so it costs nothing measurable."""

    def __init__(self, check_every: int = 50) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1; got {check_every!r}")
        self.check_every = check_every
        self.reported: set[str] = set()

    def _check(self, model, step: int) -> None:
        for name, groups in dead_scorers(model).items():
            if name not in self.reported:
                self.reported.add(name)
                logger.warning(
                    "step %d: the neural attention scorer of %s no longer depends on its inputs (weight groups %s: "
                    "every unit of a hidden layer is a dead ReLU); that layer's attention is uniform and its MLP gets "
                    "no gradient. Restarting with init='alive' or activation='leaky_relu' avoids it (README, neural "
                    "options).", step, name, groups)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._check(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.check_every == 0:
            self._check(model, state.global_step)
