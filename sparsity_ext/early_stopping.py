"""An online overfitting signal from training data alone: :class:`SparsityEarlyStopping`.

It watches, epoch by epoch, one measure of the feature layers on the *training* split (by
default the softmax sparsity; ``"sparsity_l1"`` for the scale-invariant one) and flags the
epoch at which a sustained rise has become visible. It uses no validation data; the
training loss, if given, tells it when the learning phase is over.

The online rule (the offline one, :mod:`sparsity_ext.overfitting`, sees the whole run; this
one only the past):

1. The curve ``v`` is, per epoch, the mean over layers of the measure in ``split``; ``m``
   is its trailing mean over the last ``window`` epochs.
2. The signal is *armed* once the learning phase is over: the first epoch, after the
   steepest per-epoch fall of the trailing-mean training loss seen so far, at which that
   loss falls by less than :data:`~sparsity_ext.overfitting.STEEP_SHARE` of it. Without a
   training loss it is armed from the first epoch after ``warmup_epochs``.
3. Once armed, the *baseline* is the lowest ``m`` since arming, and the threshold is
   ``max(rise_share * (max m - min m over all epochs so far), min_relative_rise * max|m|)``.
4. It *fires* at the first epoch that ends ``patience`` consecutive epochs with
   ``m >= baseline + threshold``. :attr:`fired_epoch` is that epoch; :attr:`onset_epoch` is
   the last epoch before it with ``m <= baseline + threshold / 2``, where the rise it
   reacts to left the baseline.

It only flags: stopping is the caller's choice (``sparsity-ext train --early-stop-on-sparsity``
stops the run there; ``sparsity-ext study`` lets runs go on to compare).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .overfitting import MIN_RELATIVE_RISE, RISE_SHARE, STEEP_SHARE, as_rows

__all__ = ["SparsityEarlyStopping"]


class SparsityEarlyStopping:
    """Flags the start of a sustained rise of a training-split sparsity measure (module doc).

    Use from any loop::

        signal = SparsityEarlyStopping("sparsity_l1")
        for epoch in range(1, epochs + 1):
            train_loss = train_one_epoch(...)              # the monitor sees the batches
            if signal.update(epoch, monitor.end_epoch(epoch), train_loss):
                break                                      # or just note signal.fired_epoch

    Args:
        measure: the record field to watch (``"sparsity"``, ``"sparsity_l1"``, ...).
        split: the records' split to read; ``"train"`` needs no held-out data.
        window: epochs in the trailing mean.
        patience: consecutive epochs above the threshold before it fires.
        rise_share, min_relative_rise: the threshold (module doc, step 3).
        warmup_epochs: epochs to skip when no training loss is given.
    """

    def __init__(
        self,
        measure: str = "sparsity",
        split: str = "train",
        *,
        window: int = 3,
        patience: int = 3,
        rise_share: float = RISE_SHARE,
        min_relative_rise: float = MIN_RELATIVE_RISE,
        warmup_epochs: int = 0,
    ):
        if window < 1 or patience < 1 or warmup_epochs < 0:
            raise ValueError(
                f"window and patience must be >= 1 and warmup_epochs >= 0, got window="
                f"{window}, patience={patience}, warmup_epochs={warmup_epochs}"
            )
        self.measure, self.split = measure, split
        self.window, self.patience, self.warmup_epochs = window, patience, warmup_epochs
        self.rise_share, self.min_relative_rise = rise_share, min_relative_rise
        self.epochs: list[int] = []
        self.values: list[float] = []  # v, one per update
        self.smoothed: list[float] = []  # m
        self.losses: list[float] = []  # trailing-mean training loss
        self.raw_losses: list[float] = []
        self.steepest_fall = 0.0
        self.armed_epoch: int | None = None
        self.baseline: float = math.inf
        self.above = 0  # consecutive epochs above the threshold
        self.fired_epoch: int | None = None
        self.onset_epoch: int | None = None
        self._updates = 0

    @property
    def fired(self) -> bool:
        return self.fired_epoch is not None

    def value_of(self, records) -> float:
        """Mean over layers of :attr:`measure` in :attr:`split` of one epoch's records
        (``SparsityRecord`` or dicts); NaN if none has it."""
        values = [
            float(row[self.measure])
            for row in as_rows(records)
            if row.get("split") == self.split and row.get(self.measure) is not None
        ]
        return sum(values) / len(values) if values else math.nan

    def update(
        self, epoch: int, records: float | Iterable, train_loss: float | None = None
    ) -> bool:
        """Feed one epoch: its records (or the curve's value itself) and, optionally, the
        epoch's training loss. Returns True exactly at the epoch the signal fires."""
        value = float(records) if isinstance(records, (int, float)) else self.value_of(records)
        if math.isnan(value):
            raise ValueError(
                f"no {self.measure!r} of split {self.split!r} in the records of epoch {epoch}"
            )
        self._updates += 1
        self.epochs.append(epoch)
        self.values.append(value)
        recent = self.values[-self.window :]
        self.smoothed.append(sum(recent) / len(recent))
        if self.fired or not self._arm(epoch, train_loss):
            return False
        m = self.smoothed[-1]
        if m <= self.baseline:
            self.baseline = m
        span = max(self.smoothed) - min(self.smoothed)
        threshold = max(
            self.rise_share * span, self.min_relative_rise * max(abs(v) for v in self.smoothed)
        )
        self.above = self.above + 1 if m >= self.baseline + threshold and threshold > 0 else 0
        if self.above >= self.patience:
            near = [
                e for e, v in zip(self.epochs, self.smoothed)
                if e >= self.armed_epoch and v <= self.baseline + threshold / 2
            ]  # fmt: skip
            self.fired_epoch, self.onset_epoch = epoch, near[-1]
            return True
        return False

    def _arm(self, epoch: int, train_loss: float | None) -> bool:
        """Whether the signal watches from this epoch on (module doc, step 2)."""
        if self.armed_epoch is not None:
            return True
        if train_loss is None:
            if self._updates > self.warmup_epochs:
                self.armed_epoch = epoch
            return self.armed_epoch is not None
        self.raw_losses.append(float(train_loss))
        recent = self.raw_losses[-self.window :]
        self.losses.append(sum(recent) / len(recent))
        if len(self.losses) < 2:
            return False
        fall = self.losses[-2] - self.losses[-1]
        if fall > self.steepest_fall:
            self.steepest_fall = fall
        elif self.steepest_fall > 0 and fall < STEEP_SHARE * self.steepest_fall:
            self.armed_epoch = epoch
        return self.armed_epoch is not None

    def state(self) -> dict:
        """What summary.json records: the settings and the epochs found."""
        return {
            "measure": self.measure,
            "split": self.split,
            "window": self.window,
            "patience": self.patience,
            "rise_share": self.rise_share,
            "min_relative_rise": self.min_relative_rise,
            "armed_epoch": self.armed_epoch,
            "onset_epoch": self.onset_epoch,
            "fired_epoch": self.fired_epoch,
        }
