"""The online signal (sparsity_ext.early_stopping.SparsityEarlyStopping) on synthetic runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sparsity_ext import SparsityMonitor
from sparsity_ext.early_stopping import SparsityEarlyStopping

EPOCHS = 60


def train_loss(learning_until: int) -> np.ndarray:
    """Falls 0.2/epoch until epoch index ``learning_until``, then 0.01/epoch."""
    e = np.arange(EPOCHS)
    return 3.0 - 0.2 * np.minimum(e, learning_until) - 0.01 * np.maximum(e - learning_until, 0)


def records(epoch: int, train: float, test: float) -> list[dict]:
    """Two layers per split whose mean is the given value."""
    return [
        {"epoch": epoch, "split": split, "layer": layer, "sparsity": value + offset}
        for split, value in (("train", train), ("test", test))
        for layer, offset in (("a", -0.1), ("b", 0.1))
    ]


def feed(signal, train_values, test_values=None, losses=None) -> list[int]:
    """Feed every epoch; return the epochs at which update() returned True."""
    test_values = train_values if test_values is None else test_values
    fired = []
    for i, (tr, te) in enumerate(zip(train_values, test_values)):
        loss = None if losses is None else float(losses[i])
        if signal.update(i + 1, records(i + 1, tr, te), loss):
            fired.append(i + 1)
    return fired


def test_fires_shortly_after_a_sustained_rise_of_the_training_split():
    g = np.random.default_rng(3)
    onset = 30  # epoch index; the rise starts after epoch 31
    values = 0.3 + 0.01 * np.maximum(np.arange(EPOCHS) - onset, 0) + g.normal(0, 1e-3, EPOCHS)
    signal = SparsityEarlyStopping()
    fired = feed(signal, values, losses=train_loss(10))
    assert fired == [signal.fired_epoch]  # True exactly once
    # Not before the rise; within window + patience + a few epochs of growing past the
    # threshold after it.
    assert onset + 1 < signal.fired_epoch <= onset + 1 + signal.window + signal.patience + 6
    assert onset + 1 <= signal.onset_epoch < signal.fired_epoch
    assert 10 <= signal.armed_epoch <= 14
    assert signal.state()["fired_epoch"] == signal.fired_epoch


def test_a_rise_during_the_learning_phase_does_not_fire():
    e = np.arange(EPOCHS)
    values = 0.1 + 0.3 * np.minimum(e, 15) / 15  # rises while the loss falls steeply, then flat
    signal = SparsityEarlyStopping()
    assert feed(signal, values, losses=train_loss(15)) == []
    assert not signal.fired and signal.fired_epoch is None
    # The same curve fires when the loss says learning ended early (the control).
    control = SparsityEarlyStopping()
    assert feed(control, values, losses=train_loss(2)) != []


def test_it_reads_only_its_split():
    flat, rising = np.full(EPOCHS, 0.3), 0.3 + 0.01 * np.maximum(np.arange(EPOCHS) - 30, 0)
    assert feed(SparsityEarlyStopping(), flat, rising, train_loss(10)) == []
    assert feed(SparsityEarlyStopping(split="test"), flat, rising, train_loss(10)) != []


def test_a_one_epoch_spike_does_not_fire_but_patience_epochs_up_do():
    spike = np.full(EPOCHS, 0.3)
    spike[40] = 0.9
    assert feed(SparsityEarlyStopping(window=1), spike, losses=train_loss(10)) == []
    step = np.where(np.arange(EPOCHS) >= 40, 0.6, 0.3)
    signal = SparsityEarlyStopping(window=1, patience=3)
    assert feed(signal, step, losses=train_loss(10)) == [43]  # epochs 41, 42, 43 up


def test_without_a_training_loss_it_waits_for_the_warmup():
    rising = 0.1 + 0.01 * np.arange(EPOCHS)
    signal = SparsityEarlyStopping(window=1, patience=2, warmup_epochs=20)
    for epoch, value in enumerate(rising, 1):
        signal.update(epoch, float(value))  # the curve's value itself works too
    # From epoch 21 the baseline is m = 0.30; the threshold is a quarter of the span so far,
    # 0.0025 (e - 1); m = 0.1 + 0.01 (e - 1) clears 0.30 + 0.0025 (e - 1) from epoch 28 on,
    # so the second epoch up is 29.
    assert signal.armed_epoch == 21 and signal.fired_epoch == 29


def test_bad_arguments_and_missing_measures_raise():
    with pytest.raises(ValueError, match="window and patience must be >= 1"):
        SparsityEarlyStopping(patience=0)
    signal = SparsityEarlyStopping("sparsity_l1")
    with pytest.raises(ValueError, match="no 'sparsity_l1' of split 'train'"):
        signal.update(1, records(1, 0.3, 0.3), 2.0)


def test_reads_the_monitor_records():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    x = torch.randn(8, 1, 10, 10)
    with SparsityMonitor(model) as monitor:
        model.train()
        model(x)
        got = monitor.end_epoch(1)
    signal = SparsityEarlyStopping()
    expected = np.mean([r.sparsity for r in got if r.split == "train"])
    assert signal.value_of(got) == pytest.approx(expected)
    assert not signal.update(1, got, 2.3)
