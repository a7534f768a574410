"""Loss-curve plots for training runs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_loss_curves(metrics: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Save train/valid/test MSE per epoch on a log scale as a PNG.

    ``metrics`` are the records of ``metrics.jsonl``; null values (evaluations
    not run that epoch, or a diverged loss) are left out of the lines.
    """
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for key, label, style in (
        ("train_mse", "train", "-"),
        ("valid_mse", "valid", "o-"),
        ("test_mse", "test", "s--"),
    ):
        points = [(record["epoch"], record[key]) for record in metrics if record.get(key) is not None]
        if points:
            epochs, values = zip(*points)
            axis.plot(epochs, values, style, label=label, markersize=3)
    axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("MSE of positions after 1,000 steps")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    if axis.lines:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
