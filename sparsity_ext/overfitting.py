"""The overfitting report: did the test loss really rise, and when did each activation
measure start a sustained rise, relative to the test-loss minimum?

It reports; it does not alarm. A run is called overfitting only when its test loss
really rose, and a measure's rise is presented as an early warning (the effect claimed by
Huesmann et al., arXiv:2104.06153) only when it began after the learning phase and no
later than the test-loss minimum.

Inputs are the rows a run produces, as records (``SparsityRecord``), dicts, or anything
with ``to_dict("records")``: ``history`` has one row per (epoch, split, layer) with the
measure columns (see :data:`MEASURES`), ``metrics`` one row per epoch with ``epoch``,
``test_loss`` and (for the learning phase) ``train_loss``.

The rule, with the constants below:

1. **Curves.** A measure's curve is, per epoch, the mean over layers of each layer's
   value in one split. Curves and the training loss are smoothed by a centred moving
   average over :data:`SMOOTHING_EPOCHS` epochs (fewer at the ends).
2. **Learning phase.** It lasts until the first epoch, after the smoothed training
   loss's steepest per-epoch fall, at which that loss falls by less than
   :data:`STEEP_SHARE` of the steepest fall. Without a training loss it is unknown, and
   no rise is presented as a warning.
3. **Onset.** A measure's rise is its *largest* rise: the epochs ``t < p`` of the smoothed
   curve ``s`` that maximise ``s[p] - s[t]`` (``t`` the latest minimum of ``s`` up to
   ``p``). It is a *sustained rise* when (a) it is at least :data:`RISE_SHARE` of the
   range of ``s`` and at least :data:`MIN_RELATIVE_RISE` of ``max |s|``, and (b) between
   ``t`` and ``p``, ``s`` stays at or above ``s[t] + rise / 2`` for
   :data:`SUSTAIN_EPOCHS` consecutive epochs. The onset is not ``t`` itself (smoothing
   moves a kink's minimum ``SMOOTHING_EPOCHS // 2`` epochs early, and on a noisy plateau
   the minimum falls anywhere): from the floor's end ``f`` (the last epoch up to ``p``
   with ``s`` within :data:`FLOOR_SHARE` of the rise above ``s[t]``), the breakpoint in
   ``[f - SMOOTHING_EPOCHS, f]`` of the least-squares continuous two-segment line,
   bending upwards, through the raw curve around ``f``; ``t`` if none bends upwards.
4. **Overfitting.** The test-loss minimum is the first epoch with the smallest test loss.
   The run overfits when each of the last :data:`CONFIRM_EPOCHS` epochs has a test loss
   of at least :data:`OVERFIT_RATIO` times that minimum.
5. **Lead.** ``lead_epochs = test-loss minimum epoch - onset epoch``: positive when the
   measure began rising *before* the minimum (a lead), negative when after (a lag).
   An *early warning* is an onset in an overfitting run that is at or after the end of
   the learning phase and at or before the minimum (``lead_epochs >= 0``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "CONFIRM_EPOCHS",
    "FLOOR_SHARE",
    "MEASURES",
    "MIN_RELATIVE_RISE",
    "OVERFIT_RATIO",
    "RISE_SHARE",
    "SMOOTHING_EPOCHS",
    "STEEP_SHARE",
    "SUSTAIN_EPOCHS",
    "MeasureOnset",
    "OverfittingWarning",
    "as_rows",
    "learning_phase_end",
    "measure_curve",
    "overfitting_warning",
    "smooth",
    "sustained_rise",
]

SMOOTHING_EPOCHS = 5  # centred moving-average window (odd)
# The learning phase ends once the train loss falls < 1/4 as fast as at its steepest. With
# noisy labels the train loss then keeps falling while the noise is memorised, at about
# 15-30% of its steepest rate on the default setting: that is overfitting, not learning.
STEEP_SHARE = 0.25
RISE_SHARE = 0.25  # a sustained rise spans at least a quarter of the curve's range ...
MIN_RELATIVE_RISE = 0.01  # ... and at least 1% of the curve's largest absolute value
SUSTAIN_EPOCHS = 6  # ... and holds above half its height this long (> the smoothing window)
FLOOR_SHARE = 0.05  # the rise leaves its floor when the smoothed curve is 5% of the way up
OVERFIT_RATIO = 1.1  # overfitting: the test loss ends at least 10% above its minimum ...
CONFIRM_EPOCHS = 3  # ... in each of the last 3 epochs (a one-epoch blip is not a rise)

# History columns read as measures, in report order, when present: the paper's softmax
# sparsity, the scale-invariant L1 sparsity, the share of activations <= 0, and the mean
# activation (the magnitude that the softmax measure also responds to).
MEASURES = ("sparsity", "sparsity_l1", "zero_fraction", "mean_activation")


def as_rows(table) -> list[dict]:
    """Rows as dicts from records (``_asdict``), mappings, or a table with ``to_dict``."""
    if hasattr(table, "to_dict") and not isinstance(table, dict):
        return list(table.to_dict("records"))
    return [row._asdict() if hasattr(row, "_asdict") else dict(row) for row in table]


def measure_curve(
    history, measure: str = "sparsity", split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """``(epochs, values)``: per epoch (increasing), the mean over layers of ``measure`` in
    ``split``; epochs where every layer's value is missing or NaN are left out."""
    per_epoch: dict[int, list[float]] = {}
    for row in as_rows(history):
        value = row.get(measure)
        if row.get("split") == split and value is not None and not math.isnan(float(value)):
            per_epoch.setdefault(int(row["epoch"]), []).append(float(value))
    epochs = np.array(sorted(per_epoch), dtype=int)
    return epochs, np.array([np.mean(per_epoch[e]) for e in epochs], dtype=float)


def smooth(values: Sequence[float], window: int = SMOOTHING_EPOCHS) -> np.ndarray:
    """Centred moving average over ``window`` values, over fewer at the ends."""
    values = np.asarray(values, dtype=float)
    half = window // 2
    return np.array(
        [values[max(i - half, 0) : i + half + 1].mean() for i in range(len(values))]
    )


def learning_phase_end(epochs: Sequence[int], train_loss: Sequence[float]) -> int | None:
    """The first epoch after the smoothed training loss's steepest per-epoch fall at which
    it falls by less than :data:`STEEP_SHARE` of that; the first epoch if it never falls;
    ``None`` if it never slows down (the whole run is learning) or has < 2 epochs."""
    if len(train_loss) < 2:
        return None
    falls = -np.diff(smooth(train_loss))  # falls[i]: from epoch i to epoch i + 1
    steepest = int(np.argmax(falls))
    if not falls[steepest] > 0:
        return int(epochs[0])
    for i in range(steepest + 1, len(falls)):
        if falls[i] < STEEP_SHARE * falls[steepest]:
            return int(epochs[i + 1])
    return None


@dataclass(frozen=True)
class Rise:
    """A sustained rise of a curve: onset and peak epochs, height on the smoothed curve."""

    onset: int
    peak: int
    height: float


def sustained_rise(epochs: Sequence[int], values: Sequence[float]) -> Rise | None:
    """The largest rise of ``values`` if it is sustained (module doc, step 3), else ``None``."""
    epochs, values = np.asarray(epochs, dtype=int), np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    epochs, values = epochs[keep], values[keep]
    if len(values) < 2:
        return None
    s = smooth(values)
    low, trough, peak, height = 0, 0, 0, 0.0
    for j in range(len(s)):
        if s[j] <= s[low]:
            low = j  # the latest minimum so far
        if s[j] - s[low] > height:
            trough, peak, height = low, j, s[j] - s[low]
    big_enough = height >= RISE_SHARE * (s.max() - s.min()) and height > 0
    if not (big_enough and height >= MIN_RELATIVE_RISE * np.abs(s).max()):
        return None
    above = s[trough : peak + 1] >= s[trough] + height / 2
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, above.astype(int), 0])))[::2]
    if not len(runs) or runs.max() < SUSTAIN_EPOCHS:  # runs: lengths of the runs above
        return None
    onset = _breakpoint(values, s, trough, peak)
    return Rise(int(epochs[onset]), int(epochs[peak]), float(height))


def _breakpoint(values: np.ndarray, s: np.ndarray, trough: int, peak: int) -> int:
    """Index where the rise starts (module doc, step 3): near the floor's end ``f`` (the
    last index up to ``peak`` with ``s`` within :data:`FLOOR_SHARE` of the rise above the
    minimum), the breakpoint in ``[f - SMOOTHING_EPOCHS, f]`` of the least-squares
    continuous two-segment line that bends upwards, fitted to the raw values within
    ``3 * SMOOTHING_EPOCHS`` of ``f`` (and after the smoothed curve was last above half
    the rise before ``trough``); ``trough`` if no breakpoint bends upwards."""
    height = s[peak] - s[trough]
    near_floor = s[trough : peak + 1] <= s[trough] + FLOOR_SHARE * height
    floor = trough + int(np.nonzero(near_floor)[0][-1])
    half_up = np.nonzero(s[:trough] >= s[trough] + height / 2)[0]
    lo = max(int(half_up[-1]) if len(half_up) else 0, floor - 3 * SMOOTHING_EPOCHS)
    hi = min(peak, floor + 3 * SMOOTHING_EPOCHS)
    x = np.arange(lo, hi + 1, dtype=float)
    y = values[lo : hi + 1]
    best, best_sse = trough, math.inf
    for k in range(max(lo + 1, floor - SMOOTHING_EPOCHS), min(floor, hi - 1) + 1):
        design = np.stack([np.ones_like(x), np.minimum(x - k, 0), np.maximum(x - k, 0)], 1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(np.sum((design @ coef - y) ** 2))
        bends_up = coef[2] - coef[1] > 1e-6 * (abs(coef[1]) + abs(coef[2]))  # not round-off
        if bends_up and sse < best_sse:
            best, best_sse = k, sse
    return best


@dataclass(frozen=True)
class MeasureOnset:
    """One measure's sustained rise in one split, relative to the test-loss minimum.

    ``lead_epochs`` = minimum epoch - onset epoch (positive: the rise began before the
    minimum). ``during_learning_phase`` is ``None`` when the learning phase is unknown.
    """

    measure: str
    split: str
    onset_epoch: int | None
    peak_epoch: int | None
    rise: float | None
    lead_epochs: int | None
    during_learning_phase: bool | None
    early_warning: bool

    def describe(self) -> str:
        where = f"{self.measure} ({self.split})"
        if self.onset_epoch is None:
            return f"{where}: no sustained rise"
        text = f"{where}: a sustained rise (+{self.rise:.3g}) began at epoch {self.onset_epoch}"
        if self.lead_epochs is not None:
            if self.lead_epochs > 0:
                text += f", {self.lead_epochs} epoch(s) before the test-loss minimum"
            elif self.lead_epochs < 0:
                text += f", {-self.lead_epochs} epoch(s) after the test-loss minimum"
            else:
                text += ", at the test-loss minimum"
        if self.during_learning_phase:
            text += ", during the learning phase (no warning: the network was still learning)"
        elif self.early_warning:
            text += ": an early warning"
        return text


@dataclass(frozen=True)
class OverfittingWarning:
    """Outcome of the rule (module doc); epochs are ``None`` where there is none."""

    split: str
    test_loss_min_epoch: int | None
    test_loss_min: float | None
    last_epoch: int | None
    final_test_loss: float | None
    learning_phase_end: int | None
    overfitting: bool
    onsets: tuple[MeasureOnset, ...] = field(default_factory=tuple)
    message: str = ""

    @property
    def early_warnings(self) -> list[str]:
        """The measures whose rise is an early warning (module doc, step 5)."""
        return [o.measure for o in self.onsets if o.early_warning]

    def onset(self, measure: str) -> MeasureOnset | None:
        return next((o for o in self.onsets if o.measure == measure), None)

    @property
    def sparsity_rise_epoch(self) -> int | None:
        """Onset of the softmax sparsity (``"sparsity"``), for callers of the old rule."""
        onset = self.onset("sparsity")
        return None if onset is None else onset.onset_epoch

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "onsets": {o.measure: asdict(o) for o in self.onsets},
            "early_warnings": self.early_warnings,
            "rule": {
                "smoothing_epochs": SMOOTHING_EPOCHS,
                "steep_share": STEEP_SHARE,
                "rise_share": RISE_SHARE,
                "min_relative_rise": MIN_RELATIVE_RISE,
                "sustain_epochs": SUSTAIN_EPOCHS,
                "overfit_ratio": OVERFIT_RATIO,
                "confirm_epochs": CONFIRM_EPOCHS,
                "lead_epochs": "test-loss minimum epoch - onset epoch (> 0: before)",
            },
        }


def overfitting_warning(
    history, metrics, split: str = "test", measures: Iterable[str] | None = None
) -> OverfittingWarning:
    """Apply the rule of the module doc.

    Args:
        history: rows (epoch, split, layer, measure columns...), e.g. the monitor's
            ``history`` or history.csv's rows.
        metrics: rows with epoch, test_loss and train_loss, e.g. metrics.csv's rows.
        split: whose measure curves to read.
        measures: columns to report; default every one of :data:`MEASURES` present.
    """
    history_rows = as_rows(history)
    if measures is None:
        present = set().union(*(row.keys() for row in history_rows)) if history_rows else set()
        measures = [m for m in MEASURES if m in present]
    rows = sorted(
        (r for r in as_rows(metrics) if _finite(r.get("test_loss"))), key=lambda r: r["epoch"]
    )
    if not rows:
        return OverfittingWarning(
            split, None, None, None, None, None, False, (),
            "overfitting check: no test loss recorded",
        )  # fmt: skip
    epochs = [int(r["epoch"]) for r in rows]
    test_loss = np.array([float(r["test_loss"]) for r in rows])
    i_min = int(np.argmin(test_loss))
    minimum, last = epochs[i_min], epochs[-1]
    tail = test_loss[-CONFIRM_EPOCHS:]
    overfitting = len(test_loss) > CONFIRM_EPOCHS and bool(
        np.all(tail >= OVERFIT_RATIO * test_loss[i_min])
    )
    train_loss = [r.get("train_loss") for r in rows]
    learning_end = None  # unknown without a training loss: then no rise is a warning
    if all(_finite(v) for v in train_loss):
        learning_end = learning_phase_end(epochs, [float(v) for v in train_loss])
        if learning_end is None:
            learning_end = math.inf  # the train loss fell steeply to the end: all learning
    onsets = tuple(
        _onset(history_rows, m, split, minimum, learning_end, overfitting) for m in measures
    )
    learning_end = None if learning_end == math.inf else learning_end
    return OverfittingWarning(
        split, minimum, float(test_loss[i_min]), last, float(test_loss[-1]), learning_end,
        overfitting, onsets, _message(overfitting, test_loss, epochs, i_min, onsets),
    )  # fmt: skip


def _onset(rows, measure, split, minimum, learning_end, overfitting) -> MeasureOnset:
    rise = sustained_rise(*measure_curve(rows, measure, split))
    if rise is None:
        return MeasureOnset(measure, split, None, None, None, None, None, False)
    lead = minimum - rise.onset
    learning = None if learning_end is None else rise.onset < learning_end
    warning = overfitting and learning is False and lead >= 0
    return MeasureOnset(
        measure, split, rise.onset, rise.peak, rise.height, lead, learning, warning
    )


def _message(overfitting, test_loss, epochs, i_min, onsets) -> str:
    low, final = test_loss[i_min], test_loss[-1]
    ratio = final / low if low > 0 else math.inf
    where = f"the test loss reached its minimum {low:.3f} at epoch {epochs[i_min]}"
    if overfitting:
        head = (
            f"overfitting: {where} and rose to {final:.3f} ({ratio:.2f}x) by epoch "
            f"{epochs[-1]}; validation-loss early stopping would stop at epoch {epochs[i_min]}"
        )
    elif i_min == len(epochs) - 1:
        head = f"no overfitting: the test loss was still falling at the last epoch ({epochs[-1]})"
    else:
        head = (
            f"no overfitting: {where} and ended at {final:.3f} ({ratio:.2f}x; a rise counts "
            f"from {OVERFIT_RATIO}x over the last {CONFIRM_EPOCHS} epochs)"
        )
    return "\n".join([head] + ["  " + o.describe() for o in onsets])


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
