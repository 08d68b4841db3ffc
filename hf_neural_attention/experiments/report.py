"""Figures and tables of the training runs and reproductions, written once: matplotlib on the file-only Agg backend,
one way to finish and save a figure, markdown tables, and the mean ± sd spread over seeds."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Sequence


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | os.PathLike, *, legend: bool = True, fontsize: int | None = 8,
                grid: str = "major") -> None:
    """The end of every plot: on each axis a light grid (grid="both" adds the minor lines of log axes) and, unless
    legend=False, a legend (fontsize None: matplotlib's default); then tight layout, saved at 120 dpi, closed."""
    for axis in figure.axes:
        axis.grid(alpha=0.3, which=grid)
        if legend:
            axis.legend(fontsize=fontsize)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _style(index: int) -> dict:
    """Colour, line style and marker of the index-th run: curves that lie on top of each other stay distinguishable
    by their dashes and markers, not only by the colour drawn last."""
    return {"color": f"C{index}", "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
            "marker": MARKERS[index % len(MARKERS)]}


def _differences(steps: list, values: list, reference_steps: list, reference_values: list) -> tuple[list, list]:
    """(steps, value - reference value) at the steps both curves have."""
    reference = dict(zip(reference_steps, reference_values))
    pairs = [(step, value - reference[step]) for step, value in zip(steps, values) if step in reference]
    return [step for step, _ in pairs], [difference for _, difference in pairs]


def plot_loss_curves(curves: dict[str, dict[str, list]], path: str | os.PathLike, title: str,
                     reference: str | None = None) -> None:
    """Training loss (lines) and validation loss (larger markers) against step, each run with its own colour, line
    style and marker. With `reference` (a run's label) and more than one run, a second panel shows every other run's
    loss minus the reference's at the same steps, where near-identical curves are told apart."""
    compare = reference in curves and len(curves) > 1
    figure, axes = pyplot().subplots(2 if compare else 1, 1, figsize=(7, 7.5 if compare else 4.5), sharex=True,
                                     squeeze=False, gridspec_kw={"height_ratios": [3, 2] if compare else [1]})
    axis = axes[0][0]
    for index, (label, curve) in enumerate(curves.items()):
        style = _style(index)
        if curve.get("train_steps"):
            every = max(1, len(curve["train_steps"]) // 8)
            axis.plot(curve["train_steps"], curve["train_loss"], **style, markevery=(index % every, every),
                      markersize=4, linewidth=1.2, alpha=0.85, label=f"{label} train")
        if curve.get("eval_steps"):
            axis.plot(curve["eval_steps"], curve["eval_loss"], color=style["color"], marker=style["marker"],
                      linestyle="none", markersize=7, markerfacecolor="none", markeredgewidth=1.5,
                      label=f"{label} validation")
    axis.set_ylabel("loss (cross-entropy)")
    axis.set_title(title)
    if compare:
        below = axes[1][0]
        base = curves[reference]
        below.axhline(0.0, color="black", linewidth=0.8, label=f"{reference} (reference)")
        for index, (label, curve) in enumerate(curves.items()):
            if label == reference:
                continue
            style = _style(index)
            if curve.get("train_steps") and base.get("train_steps"):
                steps, differences = _differences(curve["train_steps"], curve["train_loss"], base["train_steps"],
                                                  base["train_loss"])
                every = max(1, len(steps) // 8)
                below.plot(steps, differences, **style, markevery=(index % every, every), markersize=4,
                           linewidth=1.2, alpha=0.85, label=f"{label} train")
            if curve.get("eval_steps") and base.get("eval_steps"):
                steps, differences = _differences(curve["eval_steps"], curve["eval_loss"], base["eval_steps"],
                                                  base["eval_loss"])
                below.plot(steps, differences, color=style["color"], marker=style["marker"], linestyle="none",
                           markersize=7, markerfacecolor="none", markeredgewidth=1.5, label=f"{label} validation")
        below.set_ylabel(f"loss - {reference}'s loss")
        below.set_xlabel("step")
    else:
        axis.set_xlabel("step")
    save_figure(figure, path)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """A markdown table; `align` has one letter per column, l (left) or r (right), default all left."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align must have one l or r per column ({len(header)}); got {align!r}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells for {len(header)} columns: {row!r}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread(values: Sequence[float], digits: int = 2, *, scale: float = 1.0, signed: bool = False) -> str:
    """"mean ± sd" over seeds, both multiplied by `scale` (100: fractions as percent), the mean with its sign
    when `signed` (effects)."""
    mean, sd = mean_sd(values)
    return f"{scale * mean:{'+' if signed else ''}.{digits}f} ± {scale * sd:.{digits}f}"
