"""The overfitting report (sparsity_ext.overfitting) on synthetic runs with known answers."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest

from sparsity_ext.overfitting import (
    CONFIRM_EPOCHS,
    OVERFIT_RATIO,
    SUSTAIN_EPOCHS,
    learning_phase_end,
    measure_curve,
    overfitting_warning,
    sustained_rise,
)

EPOCHS = 60


class Record(NamedTuple):  # the shape of sparsity_ext.SparsityRecord's first fields
    epoch: int
    split: str
    layer: str
    sparsity: float
    rows: int


def history_rows(curves: dict[str, np.ndarray], split: str = "test") -> list[dict]:
    """One row per epoch x layer x measure curve of ``split`` (layers offset by +-0.05, so
    the mean over layers is the curve), plus a decoy "train" split running the other way."""
    rows = []
    for i in range(len(next(iter(curves.values())))):
        for layer, offset in (("a", -0.05), ("b", 0.05)):
            rows.append({"epoch": i + 1, "split": split, "layer": layer,
                         **{m: c[i] + offset for m, c in curves.items()}})  # fmt: skip
            rows.append({"epoch": i + 1, "split": "decoy", "layer": layer,
                         **{m: -c[i] for m, c in curves.items()}})  # fmt: skip
    return rows


def metrics_rows(test_loss: np.ndarray, train_loss: np.ndarray | None) -> list[dict]:
    rows = [{"epoch": i + 1, "test_loss": float(v)} for i, v in enumerate(test_loss)]
    if train_loss is not None:
        for row, v in zip(rows, train_loss):
            row["train_loss"] = float(v)
    return rows


def learning_then_slow(end: int, epochs: int = EPOCHS) -> np.ndarray:
    """A train loss that falls 0.2/epoch until ``end`` (epoch index), then 0.01/epoch."""
    e = np.arange(epochs)
    return 3.0 - 0.2 * np.minimum(e, end) - 0.01 * np.maximum(e - end, 0)


def u_shaped(minimum: int, rise: float, epochs: int = EPOCHS) -> np.ndarray:
    """A test loss falling to 1.0 at epoch index ``minimum``, then up to ``rise`` x 1.0."""
    e = np.arange(epochs)
    falling = 1.0 + 0.05 * (minimum - e)
    rising = 1.0 + (rise - 1.0) * (e - minimum) / (epochs - 1 - minimum)
    return np.where(e <= minimum, falling, rising)


def kink(at: int, slope: float = 0.01, epochs: int = EPOCHS, level: float = 0.3) -> np.ndarray:
    """Flat at ``level`` up to epoch index ``at``, then rising by ``slope`` per epoch."""
    return level + slope * np.maximum(np.arange(epochs) - at, 0)


def test_a_rise_during_the_learning_phase_is_reported_but_is_no_warning():
    # Sparsity rises from the first epoch, fast while the train loss falls steeply (to
    # epoch index 12), then slowly: the shape of the softmax measure on the default run.
    e = np.arange(EPOCHS)
    sparsity = 0.1 + 0.3 * (1 - np.exp(-e / 6)) + 0.002 * e
    report = overfitting_warning(
        history_rows({"sparsity": sparsity}),
        metrics_rows(u_shaped(20, 1.5), learning_then_slow(12)),
    )
    assert report.overfitting and report.message.startswith("overfitting:")
    assert report.test_loss_min_epoch == 21
    assert 11 <= report.learning_phase_end <= 15
    onset = report.onset("sparsity")
    assert onset.onset_epoch == 1 and onset.lead_epochs == 20
    assert onset.during_learning_phase is True and not onset.early_warning
    assert report.early_warnings == []
    assert "during the learning phase (no warning" in report.message
    assert "early warning" not in report.message


@pytest.mark.parametrize("blip", [0.01, 0.5])
def test_a_blip_of_the_test_loss_at_the_end_stays_silent(blip):
    # The test loss falls to the last-but-one epoch, then jumps by ``blip`` at the last
    # one; the sparsity rises late, as in a real warning. Neither a 1% blip nor a 50%
    # one-epoch jump is a rise of the test loss.
    test_loss = np.linspace(2.0, 0.5, EPOCHS)
    test_loss[-1] = test_loss[-2] * (1 + blip)
    report = overfitting_warning(
        history_rows({"sparsity": kink(40)}), metrics_rows(test_loss, learning_then_slow(10))
    )
    assert not report.overfitting
    assert report.message.startswith("no overfitting:")
    assert "WARNING" not in report.message.upper()
    assert report.early_warnings == [] and not report.onset("sparsity").early_warning
    assert report.test_loss_min_epoch == EPOCHS - 1


def test_a_real_late_onset_before_the_minimum_is_an_early_warning():
    g = np.random.default_rng(1)
    sparsity = kink(25) + g.normal(0, 0.001, EPOCHS)  # onset at epoch 26 (index 25)
    report = overfitting_warning(
        history_rows({"sparsity": sparsity}),
        metrics_rows(u_shaped(30, 1.4), learning_then_slow(10)),
    )
    onset = report.onset("sparsity")
    assert report.overfitting
    assert abs(onset.onset_epoch - 26) <= 1
    assert onset.lead_epochs == 31 - onset.onset_epoch
    assert onset.during_learning_phase is False and onset.early_warning
    assert report.early_warnings == ["sparsity"]
    assert f"{onset.lead_epochs} epoch(s) before the test-loss minimum: an early warning" in (
        report.message
    )


def test_a_rise_after_the_minimum_is_a_lag_with_a_negative_lead():
    report = overfitting_warning(
        history_rows({"sparsity": kink(40), "sparsity_l1": 0.6 - 0.001 * np.arange(EPOCHS)}),
        metrics_rows(u_shaped(30, 1.4), learning_then_slow(10)),
    )
    onset = report.onset("sparsity")
    assert onset.onset_epoch == 41 and onset.lead_epochs == -10
    assert not onset.early_warning and report.early_warnings == []
    assert "10 epoch(s) after the test-loss minimum" in report.message
    assert report.onset("sparsity_l1").onset_epoch is None  # it only falls
    assert "sparsity_l1 (test): no sustained rise" in report.message


@pytest.mark.parametrize("at", [5, 17, 30, 44])
@pytest.mark.parametrize("shape", ["kink", "v"])
def test_the_onset_is_exact_on_noise_free_curves(at, shape):
    # The smoothed curve's minimum lies SMOOTHING_EPOCHS // 2 epochs before a kink: the
    # breakpoint fit must undo that bias, or leads come out too large.
    values = kink(at, 0.02) if shape == "kink" else 0.5 + 0.02 * np.abs(np.arange(EPOCHS) - at)
    rise = sustained_rise(np.arange(1, EPOCHS + 1), values)
    assert rise is not None and rise.onset == at + 1
    assert rise.peak == EPOCHS


def test_a_straight_rise_starts_at_its_first_epoch():
    epochs = np.arange(1, EPOCHS + 1)
    assert sustained_rise(epochs, 0.01 * epochs).onset == 1
    assert sustained_rise(epochs, 0.3 + 0.3 * (1 - np.exp(-epochs / 8))).onset == 1  # concave


def test_what_is_not_a_sustained_rise():
    e = np.arange(EPOCHS)
    flat_then_short = np.where(e >= EPOCHS - SUSTAIN_EPOCHS + 2, 0.6, 0.3)  # too few epochs up
    small_after_big_fall = np.where(e < 30, 0.9 - 0.02 * e, 0.3 + 0.001 * (e - 30))
    spike = np.full(EPOCHS, 0.3)
    spike[30] = 0.6
    for values in (np.linspace(0.9, 0.1, EPOCHS), flat_then_short, small_after_big_fall, spike):
        assert sustained_rise(e + 1, values) is None
    assert sustained_rise(e + 1, np.full(EPOCHS, 0.3)) is None
    assert sustained_rise([1], [0.3]) is None and sustained_rise([], []) is None
    with_nan = kink(20)
    with_nan[[3, 40]] = np.nan  # missing epochs are skipped, not read as values
    assert sustained_rise(e + 1, with_nan).onset == 21


def test_the_test_loss_must_stay_up_for_the_last_epochs():
    base = u_shaped(30, 1.5)
    dipped = base.copy()
    dipped[-2] = 1.0 * OVERFIT_RATIO * 0.99  # one of the last CONFIRM_EPOCHS epochs not up
    train = learning_then_slow(10)
    assert overfitting_warning([], metrics_rows(base, train)).overfitting
    assert not overfitting_warning([], metrics_rows(dipped, train)).overfitting
    assert not overfitting_warning([], metrics_rows(base[: CONFIRM_EPOCHS], train)).overfitting


def test_without_a_train_loss_no_rise_is_a_warning():
    report = overfitting_warning(
        history_rows({"sparsity": kink(25)}), metrics_rows(u_shaped(30, 1.4), None)
    )
    onset = report.onset("sparsity")
    assert report.overfitting and report.learning_phase_end is None
    assert onset.onset_epoch == 26 and onset.during_learning_phase is None
    assert not onset.early_warning


def test_learning_phase_end():
    epochs = np.arange(1, EPOCHS + 1)
    assert learning_phase_end(epochs, learning_then_slow(20)) in range(20, 24)
    assert learning_phase_end(epochs, np.linspace(1, 2, EPOCHS)) == 1  # never falls
    assert learning_phase_end(epochs, np.linspace(3, 0, EPOCHS)) is None  # steep throughout
    assert learning_phase_end([1], [2.0]) is None


def test_records_dicts_and_tables_give_the_same_report():
    values = kink(25)
    dicts = history_rows({"sparsity": values})
    records = [Record(r["epoch"], r["split"], r["layer"], r["sparsity"], 4) for r in dicts]
    metrics = metrics_rows(u_shaped(30, 1.4), learning_then_slow(10))
    reports = [
        overfitting_warning(dicts, metrics),
        overfitting_warning(records, metrics),
        overfitting_warning(pd.DataFrame(dicts), pd.DataFrame(metrics)),
    ]
    assert reports[0] == reports[1] == reports[2]
    assert reports[0].onset("sparsity").onset_epoch == 26
    summary = reports[0].as_dict()
    assert summary["onsets"]["sparsity"]["lead_epochs"] == 5
    assert summary["rule"]["confirm_epochs"] == CONFIRM_EPOCHS


def test_measures_present_are_reported_in_order_and_curves_average_layers_of_one_split():
    curves = {"mean_activation": kink(10), "sparsity_l1": kink(20), "sparsity": kink(30)}
    report = overfitting_warning(
        history_rows(curves), metrics_rows(u_shaped(30, 1.4), learning_then_slow(10))
    )
    assert [o.measure for o in report.onsets] == ["sparsity", "sparsity_l1", "mean_activation"]
    epochs, values = measure_curve(history_rows(curves), "sparsity_l1", "test")
    np.testing.assert_allclose(values, kink(20))
    np.testing.assert_array_equal(epochs, np.arange(1, EPOCHS + 1))
    assert overfitting_warning(history_rows(curves), [], "test").message == (
        "overfitting check: no test loss recorded"
    )
