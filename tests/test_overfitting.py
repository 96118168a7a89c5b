"""The overfitting-warning rule (sparsity_ext.overfitting) on synthetic histories."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sparsity_ext.overfitting import (
    RISE_TOLERANCE,
    SUSTAINED_RISE_EPOCHS,
    overfitting_warning,
    sparsity_curve,
    sustained_rise_start,
)


def rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))


def make_history(
    curves: dict[str, np.ndarray], split: str = "test", first_epoch: int = 1
) -> pd.DataFrame:
    """Long-format history: one row per epoch x layer of ``split``, plus a decoy train split
    whose sparsity falls (so reading the wrong split gives another answer)."""
    rows = []
    for layer, values in curves.items():
        for i, value in enumerate(values):
            rows.append(
                dict(epoch=first_epoch + i, split=split, layer=layer, sparsity=value, entropy=1.0)
            )
            rows.append(
                dict(
                    epoch=first_epoch + i,
                    split="train",
                    layer=layer,
                    sparsity=1 - i / len(values),
                    entropy=1.0,
                )
            )
    return pd.DataFrame(rows)


def make_metrics(test_loss: np.ndarray, first_epoch: int = 1) -> pd.DataFrame:
    epochs = np.arange(first_epoch, first_epoch + len(test_loss))
    return pd.DataFrame(
        dict(
            epoch=epochs,
            train_loss=np.linspace(2, 0, len(epochs)),
            test_loss=test_loss,
            train_acc=0.5,
            test_acc=0.5,
        )
    )


def brute_force_rise(values: np.ndarray) -> int | None:
    """The definition, written out independently: the first index whose next K values all
    exceed it by more than the tolerance."""
    k = SUSTAINED_RISE_EPOCHS
    for i in range(len(values) - k):
        if min(values[i + 1 : i + 1 + k]) - values[i] > RISE_TOLERANCE:
            return i
    return None


def test_flat_then_rising_sparsity_before_the_test_loss_minimum_warns():
    g = rng()
    epochs = 30
    onset, minimum = int(g.integers(5, 15)), int(g.integers(16, 25))
    base = g.uniform(0.1, 0.3)
    # Flat (within the tolerance) up to the onset, then rising by 0.01 per epoch, per layer.
    layers = {
        f"l{j}": base
        + j * 0.1
        + 0.4 * RISE_TOLERANCE * g.uniform(-1, 1, epochs)
        + 0.01 * np.clip(np.arange(epochs) - onset, 0, None)
        for j in range(3)
    }
    loss = 1 + 0.05 * np.abs(np.arange(epochs) - minimum)
    warning = overfitting_warning(
        make_history(layers, first_epoch=1), make_metrics(loss, first_epoch=1)
    )
    assert warning.sparsity_rise_epoch == onset + 1  # epochs count from 1
    assert warning.test_loss_min_epoch == minimum + 1
    assert warning.overfitting
    assert warning.lead_epochs == minimum - onset
    curve = np.mean(list(layers.values()), axis=0)
    assert warning.sparsity_at_test_loss_min == pytest.approx(curve[minimum])
    assert warning.sparsity_at_last_epoch == pytest.approx(curve[-1])
    assert f"epoch {onset + 1}" in warning.message and warning.message.startswith("WARNING")
    assert warning.as_dict()["rule"] == {
        "sustained_rise_epochs": SUSTAINED_RISE_EPOCHS,
        "rise_tolerance": RISE_TOLERANCE,
    }


def test_rule_matches_its_definition_on_random_curves():
    g = rng()
    for _ in range(200):
        values = np.cumsum(g.normal(0, 0.01, int(g.integers(0, 12))))
        epochs = list(range(7, 7 + len(values)))
        expected = brute_force_rise(values)
        assert sustained_rise_start(epochs, values) == (
            None if expected is None else epochs[expected]
        )


def test_short_dips_and_short_rises():
    k = SUSTAINED_RISE_EPOCHS
    step = 10 * RISE_TOLERANCE
    # A rise that lasts one epoch fewer than required is no sustained rise.
    assert (
        sustained_rise_start(range(2 * k), [0.5] + [0.5 + step] * (k - 1) + [0.5] * (k + 1)) is None
    )
    # A dip that stays above the starting value does not break the rise.
    dipped = [0.2, 0.2 + 3 * step, 0.2 + step] + [0.2 + 4 * step] * k
    assert sustained_rise_start(range(len(dipped)), dipped) == 0
    # Changes within the tolerance count as flat; a falling curve never rises; NaN never rises.
    assert sustained_rise_start(range(10), 0.3 + 0.5 * RISE_TOLERANCE * np.arange(10) / 10) is None
    assert sustained_rise_start(range(10), np.linspace(0.9, 0.1, 10)) is None
    assert sustained_rise_start(range(10), [float("nan")] * 10) is None
    assert sustained_rise_start([], []) is None


def test_the_curve_is_the_mean_over_layers_of_one_split():
    g = rng()
    layers = {f"l{j}": g.uniform(0, 1, 6) for j in range(4)}
    curve = sparsity_curve(make_history(layers, split="val"), split="val")
    np.testing.assert_allclose(curve.to_numpy(), np.mean(list(layers.values()), axis=0))
    assert list(curve.index) == list(range(1, 7))


@pytest.mark.parametrize("case", ["still_falling", "no_rise", "rise_after_minimum"])
def test_no_warning_cases(case):
    epochs = 20
    rising = 0.2 + 0.01 * np.arange(epochs)
    if case == "still_falling":
        sparsity, loss = rising, np.linspace(2, 1, epochs)
    elif case == "no_rise":
        sparsity, loss = np.linspace(0.5, 0.2, epochs), 1 + 0.1 * np.abs(np.arange(epochs) - 8)
    else:  # flat until epoch 13, rising after; the test loss bottoms out at epoch 5
        sparsity = 0.2 + 0.01 * np.clip(np.arange(epochs) - 12, 0, None)
        loss = 1 + 0.1 * np.abs(np.arange(epochs) - 4)
    warning = overfitting_warning(make_history({"a": sparsity}), make_metrics(loss))
    assert not warning.overfitting
    assert not warning.message.startswith("WARNING")
    expected = {
        "still_falling": "still falling",
        "no_rise": "no sustained rise",
        "rise_after_minimum": "before feature-layer sparsity (test) began a sustained rise at "
        "epoch 13",
    }
    assert expected[case] in warning.message
