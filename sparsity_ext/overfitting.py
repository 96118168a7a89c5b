"""The overfitting warning: when does feature-layer sparsity start rising, and when is the
test loss at its minimum?

The rule, on the per-epoch history (epochs in increasing order):

1. The *sparsity curve* ``s`` is, per epoch, the mean over the monitored (feature) layers
   of each layer's mean sparsity in one split (``"test"`` by default).
2. The sparsity *starts a sustained rise* at the first epoch ``e`` after which each of the
   next :data:`SUSTAINED_RISE_EPOCHS` epochs has ``s > s[e] + RISE_TOLERANCE``: it rises
   and does not fall back to where it started for that many epochs. A curve too short to
   show that many later epochs has no rise.
3. The *test-loss minimum* is the first epoch with the smallest test loss.
4. The warning fires when the rise starts at or before the test-loss minimum and the
   minimum is not the last epoch (so the test loss has started rising again): the paper's
   observation that sparsity rises shortly before the test loss does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = [
    "RISE_TOLERANCE",
    "SUSTAINED_RISE_EPOCHS",
    "OverfittingWarning",
    "overfitting_warning",
    "sparsity_curve",
    "sustained_rise_start",
]

SUSTAINED_RISE_EPOCHS = 3  # a rise must hold for this many epochs after its start
RISE_TOLERANCE = 1e-3  # sparsity (in [0, 1]) changes up to this size count as flat


@dataclass(frozen=True)
class OverfittingWarning:
    """Outcome of the rule (module doc); epochs are ``None`` where there is none."""

    split: str
    sparsity_rise_epoch: int | None
    test_loss_min_epoch: int | None
    last_epoch: int | None
    overfitting: bool
    message: str
    sparsity_at_test_loss_min: float | None = None  # the curve's value at those two epochs
    sparsity_at_last_epoch: float | None = None

    @property
    def lead_epochs(self) -> int | None:
        """How many epochs the sparsity rise precedes the test-loss minimum."""
        if self.sparsity_rise_epoch is None or self.test_loss_min_epoch is None:
            return None
        return self.test_loss_min_epoch - self.sparsity_rise_epoch

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "lead_epochs": self.lead_epochs,
            "rule": {
                "sustained_rise_epochs": SUSTAINED_RISE_EPOCHS,
                "rise_tolerance": RISE_TOLERANCE,
            },
        }


def sparsity_curve(history: pd.DataFrame, split: str = "test") -> pd.Series:
    """Per-epoch mean over layers of the layers' mean sparsity in ``split``, indexed by epoch.

    ``history`` is long format with at least the columns epoch, split, layer, sparsity.
    """
    rows = history[history["split"] == split]
    return rows.groupby("epoch")["sparsity"].mean().sort_index()


def sustained_rise_start(epochs: Sequence[int], values: Sequence[float]) -> int | None:
    """First epoch ``e`` whose next :data:`SUSTAINED_RISE_EPOCHS` values all exceed
    ``value[e] + RISE_TOLERANCE``; ``None`` if no epoch qualifies. NaN never qualifies."""
    values = np.asarray(values, dtype=float)
    for i in range(len(values) - SUSTAINED_RISE_EPOCHS):
        following = values[i + 1 : i + 1 + SUSTAINED_RISE_EPOCHS]
        if np.all(following > values[i] + RISE_TOLERANCE):
            return int(epochs[i])
    return None


def overfitting_warning(
    history: pd.DataFrame, metrics: pd.DataFrame, split: str = "test"
) -> OverfittingWarning:
    """Apply the rule of the module doc.

    Args:
        history: long format, columns epoch, split, layer, sparsity (one row per
            epoch x split x layer), as in history.csv.
        metrics: one row per epoch, columns epoch and test_loss, as in metrics.csv.
        split: whose sparsity curve to read.
    """
    curve = sparsity_curve(history, split) if len(history) else pd.Series(dtype=float)
    rise = sustained_rise_start(list(curve.index), list(curve.values))
    losses = metrics.dropna(subset=["test_loss"]).sort_values("epoch")
    minimum = int(losses.loc[losses["test_loss"].idxmin(), "epoch"]) if len(losses) else None
    last = int(losses["epoch"].iloc[-1]) if len(losses) else None
    overfitting = rise is not None and minimum is not None and rise <= minimum < last
    at_minimum = _value_at(curve, minimum)
    at_last = _value_at(curve, last)
    where = f"feature-layer sparsity ({split})"
    if minimum is None:
        message = "overfitting check: no test loss recorded"
    elif overfitting:
        message = (
            f"WARNING: overfitting: {where} began a sustained rise at epoch {rise}, "
            f"{minimum - rise} epoch(s) before the test loss reached its minimum at epoch "
            f"{minimum}; the test loss then rose, and the sparsity went from "
            f"{_fmt(at_minimum)} to {_fmt(at_last)} by epoch {last}. Stop near epoch {minimum} "
            f"or penalise sparsity (--penalty)"
        )
    elif minimum == last:
        message = (
            f"overfitting check: the test loss was still falling at the last epoch "
            f"({last}); "
            + (
                f"{where} began a sustained rise at epoch {rise}"
                if rise is not None
                else f"no sustained rise of {where}"
            )
        )
    elif rise is None:
        message = (
            f"overfitting check: the test loss reached its minimum at epoch {minimum}, "
            f"with no sustained rise of {where}"
        )
    else:
        message = (
            f"overfitting check: the test loss reached its minimum at epoch {minimum}, "
            f"before {where} began a sustained rise at epoch {rise}"
        )
    return OverfittingWarning(split, rise, minimum, last, overfitting, message, at_minimum, at_last)


def _value_at(curve: pd.Series, epoch: int | None) -> float | None:
    return float(curve[epoch]) if epoch is not None and epoch in curve.index else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
