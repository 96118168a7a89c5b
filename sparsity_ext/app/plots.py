"""PNG plots of a run: every measure's curves per layer with the losses, the test-loss
minimum, the learning phase and each measure's onset; a layer x epoch heatmap; and the
per-channel sparsity maps of one test batch.

Drawn with matplotlib's object API onto Agg canvases (no pyplot, no global backend change),
from the files a run writes, so ``sparsity-ext plot RUN_DIR`` redraws them at any time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..overfitting import OverfittingWarning, overfitting_warning
from .run_files import atomic_open, read_run

__all__ = ["plot_channel_maps", "plot_run", "plot_sparsity_curves", "plot_sparsity_heatmap"]

CURVES_PNG = "sparsity_curves.png"
HEATMAP_PNG = "sparsity_heatmap.png"
CHANNEL_MAPS_PNG = "channel_maps.png"
SPLITS = ("train", "test")


def _layer_order(history: pd.DataFrame) -> list[str]:
    """Layers in the order the monitor recorded them (forward order)."""
    return list(dict.fromkeys(history["layer"]))


def _short(layers: list[str]) -> dict[str, str]:
    """Drop the dotted prefix that every layer name shares (``features.stage1_relu1``)."""
    parts = [name.split(".") for name in layers]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return {name: ".".join(p[common:]) for name, p in zip(layers, parts)}


def _splits(history: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(history["split"]))
    return [s for s in SPLITS if s in present] + [s for s in present if s not in SPLITS]


MEASURE_LABELS = {
    "sparsity": "softmax sparsity",
    "sparsity_l1": "L1 sparsity (scale-invariant)",
    "zero_fraction": "zero fraction (share <= 0)",
    "mean_activation": "mean activation",
}


def plot_sparsity_curves(
    history: pd.DataFrame,
    metrics: pd.DataFrame,
    path: str | os.PathLike,
    reports: dict[str, OverfittingWarning] | None = None,
) -> Path:
    """A grid: one row per measure in history (:data:`MEASURE_LABELS`, only the columns
    present), one column per split, each layer a line (colours shallow to deep); a last
    row with the train/test loss (log scale) and accuracy. Every panel marks the test-loss
    minimum (red dashed) and shades the learning phase; a measure's panel marks its onset
    (orange dotted) from ``reports[split]`` (default: the rule applied to each split)."""
    layers, splits = _layer_order(history), _splits(history)
    short, colours = _short(layers), _layer_colours(len(layers))
    measures = [m for m in MEASURE_LABELS if m in history]
    if reports is None:
        reports = {split: overfitting_warning(history, metrics, split=split) for split in splits}
    fig = Figure(
        figsize=(6.0 * len(splits), 2.8 * (len(measures) + 1) + 0.8), layout="constrained"
    )
    axes = fig.subplots(len(measures) + 1, len(splits), squeeze=False, sharex=True)
    for col, split in enumerate(splits):
        rows = history[history["split"] == split]
        report = reports.get(split)
        for ax, measure in zip(axes[:, col], measures):
            table = rows.pivot(index="epoch", columns="layer", values=measure)
            for layer, colour in zip(layers, colours):
                if layer in table:
                    ax.plot(table.index, table[layer], color=colour, lw=1.5, label=short[layer])
            ax.set(title=f"{MEASURE_LABELS[measure]}, {split} split", ylabel=measure)
            onset = report.onset(measure) if report is not None else None
            if onset is not None and onset.onset_epoch is not None:
                ax.axvline(onset.onset_epoch, color="tab:orange", ls=":", lw=1.8,
                           label="onset of its sustained rise")  # fmt: skip
            _mark_phases(ax, report, metrics["epoch"].min())
    loss_ax, acc_ax = axes[-1, 0], axes[-1, -1]
    for split, style in (("train", "--"), ("test", "-")):
        loss_ax.plot(metrics["epoch"], metrics[f"{split}_loss"], "k" + style, lw=1.2,
                     label=f"{split} loss")  # fmt: skip
        acc_ax.plot(metrics["epoch"], metrics[f"{split}_acc"], "k" + style, lw=1.2,
                    label=f"{split} accuracy")  # fmt: skip
    loss_ax.set(yscale="log", title="cross-entropy loss (log scale)", xlabel="epoch")
    acc_ax.set(title="accuracy", xlabel="epoch")
    for ax in {loss_ax, acc_ax}:
        _mark_phases(ax, reports.get("test"), metrics["epoch"].min())
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside lower center",
               ncols=min(len(labels), 6))  # fmt: skip
    return _save(fig, path)


def _mark_phases(ax, report: OverfittingWarning | None, first_epoch: int) -> None:
    """Shade the learning phase; a red dashed line at the test-loss minimum."""
    if report is None or report.test_loss_min_epoch is None:
        return
    if report.learning_phase_end is not None:
        ax.axvspan(first_epoch, report.learning_phase_end, color="0.9", zorder=0,
                   label=f"learning phase (to epoch {report.learning_phase_end})")  # fmt: skip
    ax.axvline(report.test_loss_min_epoch, color="tab:red", ls="--", lw=1.2,
               label=f"test-loss minimum (epoch {report.test_loss_min_epoch})")  # fmt: skip


def plot_sparsity_heatmap(history: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Layer (rows, shallow at top) x epoch (columns) heatmap of mean sparsity, per split."""
    layers, splits = _layer_order(history), _splits(history)
    short = _short(layers)
    vmax = float(np.nanmax(history["sparsity"])) if len(history) else 1.0
    fig = Figure(figsize=(6.5 * len(splits), 1.2 + 0.45 * len(layers)), layout="constrained")
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    for ax, split in zip(axes, splits):
        table = history[history["split"] == split].pivot(
            index="layer", columns="epoch", values="sparsity"
        )
        table = table.reindex([layer for layer in layers if layer in table.index])
        epochs = table.columns.to_numpy()
        image = ax.imshow(
            table.to_numpy(),
            aspect="auto",
            cmap="magma",
            vmin=0.0,
            vmax=max(vmax, 1e-6),
            interpolation="nearest",
            extent=(epochs.min() - 0.5, epochs.max() + 0.5, len(table) - 0.5, -0.5),
        )
        ax.set_yticks(range(len(table)), [short[layer] for layer in table.index], fontsize=8)
        ax.set(title=f"mean sparsity, {split} split", xlabel="epoch")
        fig.colorbar(image, ax=ax, label="sparsity")
    return _save(fig, path)


def plot_channel_maps(maps: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Per layer, the sparsity of every (sample, channel) row of one batch: samples down,
    channels across, one colour scale from 0 (uniform) to 1 (one position holds all)."""
    layers = list(maps)
    short = _short(layers)
    fig = Figure(figsize=(3.2 * len(layers) + 1, 3.6), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    image = None
    for ax, layer in zip(axes, layers):
        image = ax.imshow(
            maps[layer], aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        ax.set(title=short[layer], xlabel="channel", ylabel="sample")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="sparsity")
    fig.suptitle("per-channel sparsity of one test batch after training")
    return _save(fig, path)


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Redraw every PNG of a run from its history.csv, metrics.csv and channel_maps.npz,
    read and checked by :func:`~sparsity_ext.app.run_files.read_run` (which raises
    RunFileError naming a missing or malformed file)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    written = [
        plot_sparsity_curves(run.history, run.metrics, run_dir / CURVES_PNG),
        plot_sparsity_heatmap(run.history, run_dir / HEATMAP_PNG),
    ]
    if run.channel_maps:
        written.append(plot_channel_maps(run.channel_maps, run_dir / CHANNEL_MAPS_PNG))
    return written


def _layer_colours(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(count - 1, 1)) for i in range(count)]


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110)
    return path
