"""Training-curve figures and result tables of the experiments (matplotlib, no display).

Curves are read from run directories (:mod:`geonorm_jax.rundir`). A run that
diverged is drawn up to its last finite training loss and ends in an ``X``
marker. A run that diverged in its first epoch has only the marker, at the
top edge of its panel. Model names and the red GeoNorm curves follow Meng et
al., "Towards Geometric Normalization Techniques in SE(3) Equivariant Graph
Neural Networks for Physical Dynamics Simulations".
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from geonorm_jax.config import TrainConfig  # noqa: E402
from geonorm_jax.rundir import RunDirectory  # noqa: E402

GEONORM_COLOR = "tab:red"


def model_label(config: TrainConfig) -> str:
    """Name a config's model as in Meng et al. (EGNN, EGNN-LN, -SN, -GN), with our GeoNorm modes in brackets."""
    if config.norm == "none":
        return "EGNN"
    if config.norm == "layernorm":
        return "EGNN-LN"
    if config.norm == "scalenorm":
        return "EGNN-SN"
    label = "EGNN-GN"
    extras = []
    if config.norm_mode != "particle":
        extras.append(f"{config.norm_mode} g,b")
    if config.sigma != "particle":
        extras.append(f"{config.sigma} sigma")
    return f"{label} ({', '.join(extras)})" if extras else label


def model_color(config: TrainConfig) -> str:
    """Return the curve color of a model: GeoNorm of Meng et al. in red, our GeoNorm modes in other warm tones."""
    if config.norm == "geonorm":
        if config.norm_mode == "particle" and config.sigma == "particle":
            return GEONORM_COLOR
        if config.norm_mode == "shared":
            return "tab:orange"
        if config.norm_mode == "adaptive":
            return "tab:pink"
        return "tab:brown"
    return {"none": "tab:gray", "layernorm": "tab:green", "scalenorm": "tab:blue"}[config.norm]


@dataclasses.dataclass
class Curve:
    """One run's training MSE per epoch, ready to draw.

    ``values`` contains the finite training MSEs (epochs in ``epochs``).
    ``diverged_at`` is the epoch of divergence, or None for a run that did not
    diverge. ``planned_epochs`` is the run's configured number of epochs.
    """

    label: str
    epochs: list[int]
    values: list[float]
    color: str = "black"
    linestyle: str = "-"
    diverged_at: int | None = None
    highlight: bool = False
    planned_epochs: int | None = None


def read_curve(run_dir: str | Path, label: str, **style: Any) -> Curve:
    """Read a run directory's training curve and divergence epoch."""
    directory = RunDirectory(run_dir)
    points = [
        (record["epoch"], record["train_mse"])
        for record in directory.read_metrics()
        if record.get("train_mse") is not None and math.isfinite(record["train_mse"])
    ]
    summary = directory.read_summary() or {}
    status = summary.get("status", "")
    diverged_at = int(status.rsplit(" ", 1)[-1]) if status.startswith("diverged") else None
    epochs = [epoch for epoch, _ in points]
    values = [value for _, value in points]
    planned_epochs = directory.read_config().epochs if directory.config_path.exists() else None
    return Curve(label, epochs, values, diverged_at=diverged_at, planned_epochs=planned_epochs, **style)


def draw_curve(axis, curve: Curve) -> None:
    """Draw ``curve`` on a log-scale axis, with an ``X`` where it diverged."""
    label = curve.label
    if curve.diverged_at is not None:
        label += f" (diverged at epoch {curve.diverged_at})"
    width = 2.0 if curve.highlight else 1.2
    zorder = 3 if curve.highlight else 2
    if curve.values:
        # A single epoch draws no line segment, so it gets a dot.
        marker = "o" if len(curve.values) == 1 else None
        axis.plot(curve.epochs, curve.values, curve.linestyle, color=curve.color, linewidth=width,
                  marker=marker, markersize=4, label=label, zorder=zorder)
    if curve.diverged_at is None:
        return
    if curve.values:
        axis.plot(curve.epochs[-1], curve.values[-1], "X", color=curve.color, markersize=9,
                  markeredgecolor="black", zorder=4)
    else:
        # No finite loss at all: mark the divergence epoch at the top edge of the panel.
        top = blended_transform_factory(axis.transData, axis.transAxes)
        axis.plot(curve.diverged_at, 0.97, "X", color=curve.color, markersize=9, markeredgecolor="black",
                  transform=top, clip_on=False, zorder=4, label=label)


def plot_panels(
    panels: Sequence[tuple[str, Sequence[Curve]]],
    path: str | Path,
    title: str,
    *,
    ncols: int = 2,
    ylabel: str = "training MSE of positions",
) -> Path:
    """Save a grid of log-scale training-curve panels as a PNG and return its path.

    Args:
      panels: ``(panel title, curves)`` pairs, drawn row by row.
      path: output file.
      title: figure title.
      ncols: panels per row.
      ylabel: label of every panel's y axis.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    figure, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), dpi=110, squeeze=False)
    for axis, (panel_title, curves) in zip(axes.flat, panels):
        for curve in curves:
            draw_curve(axis, curve)
        axis.set_yscale("log")
        last_epoch = max((curve.planned_epochs or max(curve.epochs, default=1) for curve in curves), default=1)
        axis.set_xlim(0.5, max(last_epoch, 2) + 0.5)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(ylabel)
        axis.set_title(panel_title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], stem: str | Path,
                *, digits: int = 4, title: str | None = None) -> tuple[Path, Path]:
    """Write ``rows`` as ``stem.md`` (Markdown) and ``stem.csv``; return both paths.

    Missing or None cells are empty. Floats get ``digits`` significant digits in
    Markdown and full precision in the CSV.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path = stem.with_suffix(".csv")
    markdown_path = stem.with_suffix(".md")

    with csv_path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({column: _csv_cell(row.get(column)) for column in columns})

    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [_markdown_cell(row.get(column), digits) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    markdown_path.write_text("\n".join(lines) + "\n")
    return markdown_path, csv_path


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def _markdown_cell(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|")
