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


def plot_loss_curves(curves: dict[str, dict[str, list]], path: str | os.PathLike, title: str) -> None:
    """One figure: training loss (solid) and validation loss (dashed) against step, one colour per run."""
    figure, axis = pyplot().subplots(figsize=(7, 4.5))
    for index, (label, curve) in enumerate(curves.items()):
        color = f"C{index}"
        if curve.get("train_steps"):
            axis.plot(curve["train_steps"], curve["train_loss"], color=color, label=f"{label} train", alpha=0.8)
        if curve.get("eval_steps"):
            axis.plot(curve["eval_steps"], curve["eval_loss"], color=color, linestyle="--", marker="o",
                      markersize=3, label=f"{label} validation")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (cross-entropy)")
    axis.set_title(title)
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
