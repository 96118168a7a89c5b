"""The experiment around the measure: label noise, the online signal in `train`, and
`sparsity-ext study` (its runs, its table and its resumption)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sparsity_ext.app import loop
from sparsity_ext.app.cli import main
from sparsity_ext.app.data import load_dataset, with_label_noise
from sparsity_ext.app.errors import ConfigError
from sparsity_ext.app.study import study_configs, summarise_study
from sparsity_ext.early_stopping import SparsityEarlyStopping


def test_label_noise_changes_exactly_that_share_of_training_labels_only():
    data = load_dataset("digits", seed=4)
    noisy = with_label_noise(data, 0.3, seed=4)
    wrong = noisy.train_y != data.train_y
    assert int(wrong.sum()) == round(0.3 * len(data.train_y)) == 300
    assert torch.equal(noisy.test_y, data.test_y) and torch.equal(noisy.train_x, data.train_x)
    assert ((noisy.train_y >= 0) & (noisy.train_y < 10)).all()
    # The wrong labels are spread over the classes, not one shifted class.
    assert len(torch.unique(noisy.train_y[wrong] - data.train_y[wrong])) > 10
    assert torch.equal(with_label_noise(data, 0.3, seed=4).train_y, noisy.train_y)
    assert not torch.equal(with_label_noise(data, 0.3, seed=5).train_y, noisy.train_y)
    assert with_label_noise(data, 0.0, seed=4) is data
    with pytest.raises(ConfigError, match=r"--label-noise must be in \[0, 1\)"):
        with_label_noise(data, 1.0, seed=4)


def test_study_configs_run_a_zero_penalty_once():
    base = loop.TrainConfig(epochs=3)
    configs = study_configs(base, Path("S"), [0, 1], [0.0, 0.3], [0.0, 0.5], ["softmax", "l1"])
    settings = [(c.label_noise, c.penalty, c.penalty_normalize) for c in configs[::2]]
    assert settings == [
        (0.0, 0.0, "softmax"), (0.0, 0.5, "softmax"), (0.0, 0.5, "l1"),
        (0.3, 0.0, "softmax"), (0.3, 0.5, "softmax"), (0.3, 0.5, "l1"),
    ]  # fmt: skip
    assert [c.seed for c in configs[:2]] == [0, 1]
    assert len({c.out for c in configs}) == len(configs) == 12
    assert configs[2].out == str(Path("S/runs/noise0_penalty0.5_softmax_seed0"))
    assert all(c.epochs == 3 and not c.progress for c in configs)


def test_the_summary_tables_show_signed_leads_per_seed():
    table = pd.DataFrame(
        {
            "label_noise": [0.3, 0.3, 0.0], "penalty": [0.0, 0.0, 0.5],
            "penalty_normalize": ["softmax", "softmax", "l1"], "seed": [0, 1, 0],
            "overfitting": [True, False, True], "test_loss_min_epoch": [20, 24, 30],
            "test_loss_min": [0.4, 0.5, 0.1], "loss_rise": [1.5, 1.3, 1.2],
            "learning_phase_end": [15, 17, 12],
            "lead_sparsity": [19, 23, np.nan], "learning_phase_sparsity": [True, True, None],
            "lead_sparsity_l1": [-7, 3, -2], "learning_phase_sparsity_l1": [False] * 3,
            "signal_sparsity": [28, np.nan, 40], "test_acc_at_signal_sparsity": [0.9, np.nan, 0.8],
            "test_acc_at_min": [0.95, 0.94, 0.97], "test_acc_final": [0.8, 0.85, 0.96],
            "sparsity_final": [0.4, 0.5, 0.1],
        }
    )  # fmt: skip
    text = summarise_study(table)
    assert "| 0.3 | 0 | 2 | 1/2 | 20 24 | 0.450 ± 0.071 | 1.40 ± 0.14 |" in text
    assert "| 0.3 | 0 | 15 17 | +19L +23L | -7 +3 |" in text
    assert "| 0 | 0.5 l1 | 12 | - | -2 |" in text
    assert "| 0.3 | 0 | 28 - | 0.900 | 0.945 ± 0.007 | 0.825 ± 0.035 |" in text


class FiresAtEpoch2(SparsityEarlyStopping):
    def update(self, epoch, records, train_loss=None):
        super().update(epoch, records, train_loss)
        if epoch == 2 and self.fired_epoch is None:
            self.fired_epoch = self.onset_epoch = 2
            return True
        return False


def test_train_stops_where_the_online_signal_fires(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "SparsityEarlyStopping", FiresAtEpoch2)
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--epochs", "5", "--train-size", "64", "--test-size",
            "64", "--no-progress", "--early-stop-on-sparsity"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["online_signal"]["stopped_at_epoch"] == 2
    assert summary["online_signal"]["sparsity"]["fired_epoch"] == 2
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2]
    assert "fired at epoch 2; the run stopped there" in capsys.readouterr().out
    # Without the flag the same signal only marks the epoch.
    assert main(args[:-1] + ["--out", str(tmp_path / "marked")]) == 0
    summary = json.loads((tmp_path / "marked" / "summary.json").read_text())
    assert summary["online_signal"]["stopped_at_epoch"] is None
    assert summary["online_signal"]["sparsity"]["fired_epoch"] == 2
    assert len(pd.read_csv(tmp_path / "marked" / "metrics.csv")) == 5


def test_study_writes_its_table_and_figure_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--out", str(out), "--seeds", "3", "--epochs", "3", "--train-size", "64",
            "--label-noise", "0", "0.5"]  # fmt: skip
    assert main(args) == 0
    table = pd.read_csv(out / "study.csv")
    assert list(table["label_noise"]) == [0.0, 0.5] and list(table["seed"]) == [3, 3]
    for column in ("test_loss_min_epoch", "lead_sparsity", "signal_sparsity",
                   "test_acc_at_min", "test_acc_final", "sparsity_final"):  # fmt: skip
        assert column in table
    metrics = pd.read_csv(out / "runs" / "noise0.5_penalty0_seed3" / "metrics.csv")
    best = metrics["test_loss"].idxmin()
    assert table.loc[1, "test_loss_min_epoch"] == metrics.loc[best, "epoch"]
    assert table.loc[1, "test_acc_at_min"] == pytest.approx(metrics.loc[best, "test_acc"])
    assert (out / "study.png").stat().st_size > 10_000
    assert "| 0.5 | 0 | 1 |" in (out / "study_summary.md").read_text()
    capsys.readouterr()
    assert main(args) == 0  # the runs are read back, not retrained
    assert capsys.readouterr().out.count("(done before)") == 2
    pd.testing.assert_frame_equal(pd.read_csv(out / "study.csv"), table)
