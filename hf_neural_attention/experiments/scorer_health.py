"""Whether a neural attention scorer still depends on its inputs, and a Trainer callback that warns when it stops.

The paper's MLP for d_h = 64 is 4 -> 2 -> 1 -> 1: one ReLU unit before the output. A ReLU unit whose incoming
weights and bias are all <= 0 is dead for every input once its inputs are themselves ReLU outputs (>= 0): from the
second hidden layer on, that is a certificate read from the weights alone. When every unit of such a layer is dead,
the scorer outputs its last bias for every (query, key) pair, the layer's attention is uniform over the visible keys,
and no gradient reaches the MLP again. `activation="leaky_relu"` cannot die this way; `init="alive"` (positive biases)
is never dead at init.

A scorer can also be dead on the data only: its first hidden layer (whose inputs, the projected q and k, can have any
sign) is dead for every (query, key) pair the model produces, though some other input would revive it. The weights
certify nothing then, so the monitor also probes the data: every `check_every` steps it arms a one-shot probe that,
on the next forward call of each neural layer, takes that call's queries and keys (one sequence, up to
PROBE_POSITIONS positions), scores every pair among them with the layer's own score rule, and checks whether the
attention is exactly what a constant MLP gives (uniform weights for combine="replace", plain q.k weights for "add").
"""

from __future__ import annotations

import inspect
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


PROBE_POSITIONS = 128  # positions (queries and keys) of one sequence scored by the data probe
PROBE_TOLERANCE = 1e-6  # largest attention-weight difference that still counts as constant (float32 rounding: ~1e-7)


@torch.no_grad()
def constant_on_data(scorer: NeuralAttention, query: torch.Tensor, key: torch.Tensor, scaling: float) -> list[int]:
    """Heads whose MLP scores are constant over every (query, key) pair of one sequence of these inputs: the scorer's
    attention among the first PROBE_POSITIONS positions of the first sequence (every pair visible) equals what a
    constant MLP gives: uniform weights (combine="replace") or softmax(q.k * scaling) (combine="add")."""
    from ..masks import split_attention_mask

    positions = min(query.shape[2], key.shape[2], PROBE_POSITIONS)
    if positions < 2:
        return []
    q = query[:1, :, :positions].detach().float()
    k = key[:1, :, :positions].detach().float()
    mask = split_attention_mask(None, positions, positions, False, q.device)
    with torch.autocast(q.device.type, enabled=False):
        weights = scorer.attention_weights(q, k, mask, scaling)  # [1, H, m, m]
        if scorer.combine == "add":
            constant = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, dim=-1)
        else:
            constant = torch.full_like(weights, 1.0 / positions)
    deviation = (weights - constant).abs().amax(dim=(0, 2, 3))  # per head
    return [int(head) for head in (deviation <= PROBE_TOLERANCE).nonzero().flatten()]


# The variant methods every engine calls first with the call's queries and keys: attention_weights (the plain path),
# prepare (the chunked engine) and kernel_inputs (the fused kernels). FlexAttention (inference only, where enabled)
# calls none; the probe then waits for a call that does.
PROBED_METHODS = ("attention_weights", "prepare", "kernel_inputs")


class _DataProbe:
    """Wraps one neural layer's entry points until its next call, which it probes."""

    def __init__(self, scorer: NeuralAttention, report) -> None:
        self.scorer, self.report = scorer, report
        for name in PROBED_METHODS:
            setattr(scorer, name, self._wrap(getattr(scorer, name)))

    def _wrap(self, original):
        signature = inspect.signature(original)

        def probed(*args, **kwargs):
            self.remove()
            arguments = signature.bind(*args, **kwargs).arguments
            self.report(self.scorer, constant_on_data(self.scorer, arguments["query"], arguments["key"],
                                                      arguments["scaling"]))
            return original(*args, **kwargs)

        return probed

    def remove(self) -> None:
        for name in PROBED_METHODS:
            self.scorer.__dict__.pop(name, None)  # back to the class's methods


class NeuralScorerMonitor(TrainerCallback):
    """Warns (once per layer) when a neural scorer's output no longer depends on its inputs, at the start of training
    and every `check_every` steps, in two ways: from the weights (a dead hidden layer after the first, for every
    input; costs nothing measurable) and on the data (the next forward call after the check, see constant_on_data:
    one sequence's first PROBE_POSITIONS positions scored once, without gradients)."""

    def __init__(self, check_every: int = 50, probe_data: bool = True) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1; got {check_every!r}")
        self.check_every = check_every
        self.probe_data = probe_data
        self.reported: set[str] = set()
        self.probes: dict[str, _DataProbe] = {}
        self.step = 0

    def _arm_probes(self, model) -> None:
        for name, module in model.named_modules():
            layer = name.removesuffix(".attention_variant")
            if isinstance(module, NeuralAttention) and layer not in self.reported and layer not in self.probes:
                self.probes[layer] = _DataProbe(
                    module, lambda scorer, heads, layer=layer: self._report_data(layer, scorer, heads))

    def _report_data(self, layer: str, scorer: NeuralAttention, heads: list[int]) -> None:
        self.probes.pop(layer, None)
        if heads and layer not in self.reported:
            self.reported.add(layer)
            logger.warning(
                "after step %d: the neural attention scorer of %s is dead on the data: on a probe of the model's inputs its "
                "MLP gives the same score to every (query, key) pair in heads %s (its weights would revive it on other "
                "inputs, so the weight check does not see it); that layer's attention is %s and its MLP gets no "
                "gradient. Restarting with activation='leaky_relu' or init='alive' avoids it (README, neural options).",
                self.step, layer, heads,
                "plain q.k attention" if scorer.combine == "add" else "uniform")

    def _check(self, model, step: int) -> None:
        self.step = step
        for name, groups in dead_scorers(model).items():
            if name not in self.reported:
                self.reported.add(name)
                logger.warning(
                    "step %d: the neural attention scorer of %s no longer depends on its inputs (weight groups %s: "
                    "every unit of a hidden layer is a dead ReLU); that layer's attention is uniform and its MLP gets "
                    "no gradient. Restarting with init='alive' or activation='leaky_relu' avoids it (README, neural "
                    "options).", step, name, groups)
        if self.probe_data:  # the layers the weights did not certify: on the next forward call
            self._arm_probes(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._check(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.check_every == 0:
            self._check(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Arms a last probe: the final evaluation's first forward call checks the trained scorers on the data."""
        if model is not None:
            self._check(model, state.global_step)

    def remove_probes(self) -> None:
        """Restores every layer's own methods (a probe left armed is otherwise removed by the next forward call)."""
        for probe in list(self.probes.values()):
            probe.remove()
        self.probes.clear()
