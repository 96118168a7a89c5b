"""PNG plots of a run: sparsity curves with the losses, a layer x epoch heatmap, and the
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

from ..overfitting import overfitting_warning
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


def plot_sparsity_curves(
    history: pd.DataFrame,
    metrics: pd.DataFrame,
    path: str | os.PathLike,
    rise_epoch: int | None = None,
    loss_min_epoch: int | None = None,
) -> Path:
    """One panel per split: each layer's mean sparsity over epochs (left axis, colours from
    shallow to deep) and the train/test loss (right axis, log scale, black); dotted and
    dashed verticals mark the sparsity-rise epoch and the test-loss minimum."""
    layers, splits = _layer_order(history), _splits(history)
    short = _short(layers)
    colours = _layer_colours(len(layers))
    fig = Figure(figsize=(6.5 * len(splits), 5.0), layout="constrained")
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    for ax, split in zip(axes, splits):
        table = history[history["split"] == split].pivot(
            index="epoch", columns="layer", values="sparsity"
        )
        for layer, colour in zip(layers, colours):
            if layer in table:
                ax.plot(table.index, table[layer], color=colour, lw=1.8, label=short[layer])
        ax.set(title=f"sparsity per layer, {split} split", xlabel="epoch", ylabel="mean sparsity")
        loss_ax = ax.twinx()
        loss_ax.plot(
            metrics["epoch"],
            metrics["train_loss"],
            color="black",
            ls="--",
            lw=1.2,
            label="train loss",
        )
        loss_ax.plot(
            metrics["epoch"], metrics["test_loss"], color="black", lw=1.2, label="test loss"
        )
        loss_ax.set_yscale("log")  # the test loss's late rise is small next to its first drop
        loss_ax.set_ylabel("cross-entropy loss (log scale)")
        if rise_epoch is not None:
            ax.axvline(
                rise_epoch,
                color="tab:orange",
                ls=":",
                lw=1.5,
                label=f"sparsity rise (epoch {rise_epoch})",
            )
        if loss_min_epoch is not None:
            ax.axvline(
                loss_min_epoch,
                color="tab:red",
                ls="--",
                lw=1.2,
                label=f"test-loss min (epoch {loss_min_epoch})",
            )
        handles = ax.get_legend_handles_labels()
        loss_handles = loss_ax.get_legend_handles_labels()
    fig.legend(
        handles[0] + loss_handles[0],
        handles[1] + loss_handles[1],
        fontsize=8,
        loc="outside lower center",
        ncols=min(len(handles[1]) + 2, 6),
    )
    return _save(fig, path)


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
    split = ((run.summary or {}).get("overfitting") or {}).get("split", "test")
    warning = overfitting_warning(run.history, run.metrics, split=split)
    written = [
        plot_sparsity_curves(
            run.history,
            run.metrics,
            run_dir / CURVES_PNG,
            warning.sparsity_rise_epoch,
            warning.test_loss_min_epoch,
        ),
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
