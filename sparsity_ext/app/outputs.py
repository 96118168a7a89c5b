"""What a run writes: the summary dict, the CSVs, channel maps and the plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..overfitting import OverfittingWarning
from .run_files import CHANNEL_MAPS_NPZ, HISTORY_CSV, METRICS_CSV, SUMMARY_JSON, atomic_open

__all__ = ["summarise", "write_outputs"]


def summarise(
    config,
    device: torch.device,
    world: int,
    metrics: pd.DataFrame,
    history: pd.DataFrame,
    warning: OverfittingWarning,
    seconds: float,
) -> dict:
    last = metrics.iloc[-1]
    final = {
        name: float(last[name]) for name in ("train_loss", "test_loss", "train_acc", "test_acc")
    }
    final["best_test_acc"] = float(metrics["test_acc"].max())
    final["min_test_loss"] = float(metrics["test_loss"].min())
    last_epoch = history[history["epoch"] == history["epoch"].max()]
    final["mean_sparsity"] = {
        split: float(group["sparsity"].mean()) for split, group in last_epoch.groupby("split")
    }
    return {
        "config": asdict(config),
        "world_size": world,
        "device": str(device),
        "torch_version": torch.__version__,
        "overfitting": warning.as_dict(),
        "final": final,
        "seconds": round(seconds, 2),
    }


def write_outputs(
    out: Path,
    history: pd.DataFrame,
    metrics: pd.DataFrame,
    summary: dict,
    channel_maps: dict[str, torch.Tensor],
) -> None:
    """Write the run's files into ``out`` (created if needed), each atomically
    (:func:`~sparsity_ext.app.run_files.atomic_open`), then draw the plots from them."""
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / HISTORY_CSV) as f:
        history.to_csv(f, index=False)
    with atomic_open(out / METRICS_CSV) as f:
        metrics.to_csv(f, index=False)
    with atomic_open(out / SUMMARY_JSON) as f:
        json.dump(summary, f, indent=2)
    with atomic_open(out / CHANNEL_MAPS_NPZ, "wb") as f:
        np.savez_compressed(f, **{k: v.numpy() for k, v in channel_maps.items()})
    plots.plot_run(out)
