"""What a run writes: the summary dict, the CSVs, channel maps and the plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..overfitting import OverfittingWarning

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
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    history.to_csv(out / "history.csv", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    np.savez_compressed(out / "channel_maps.npz", **{k: v.numpy() for k, v in channel_maps.items()})
    plots.plot_run(out)
