"""SparsityCallback with a real lightning.Trainer on CPU: logging, splits, penalty, DDP."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from sparsity_ext.integrations.lightning import SparsityCallback  # noqa: E402
from sparsity_ext.monitor import SparsityRecord  # noqa: E402

CHANNELS = {"net.1": 4, "net.3": 6}  # the two ReLUs of Net


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.0, ce_weight: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
        )  # fmt: skip
        self.lr, self.ce_weight = lr, ce_weight

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.ce_weight * F.cross_entropy(self.net(x), y)  # the network, not self(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loaders(train: int, val: int, batch: int = 4):
    g = torch.Generator().manual_seed(1)
    make = lambda n: TensorDataset(torch.randn(n, 1, 6, 6, generator=g),  # noqa: E731
                                   torch.randint(0, 3, (n,), generator=g))  # fmt: skip
    return DataLoader(make(train), batch), DataLoader(make(val), batch)


def trainer(tmp_path, epochs: int, **kwargs):
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=1, **kwargs,
    )  # fmt: skip


def logged(tmp_path) -> pd.DataFrame:
    (path,) = tmp_path.glob("run/version_*/metrics.csv")
    frame = pd.read_csv(path)
    return frame[frame["sparsity/train/net.1/rows"].notna()].reset_index(drop=True)


def test_every_column_of_every_layer_is_logged_per_epoch_and_the_rule_runs(tmp_path):
    train, val = loaders(10, 6)
    module = Net(lr=0.0)  # fixed weights: the logged means can be recomputed by hand
    callback = SparsityCallback()
    hooks_before = {n: len(m._forward_hooks) for n, m in module.named_modules()}
    trainer(tmp_path, epochs=2, devices=1, callbacks=[callback]).fit(module, train, val)
    frame = logged(tmp_path)
    assert list(frame["epoch"]) == [0, 1]
    for split, data, n in (("train", train, 10), ("val", val, 6)):
        with torch.no_grad():
            acts = [module.net[:2](x) for x, _ in data]
        a = torch.cat(acts).double().flatten(2)
        for name, channels in CHANNELS.items():
            # every sample once per epoch; the sanity-check batch is not counted
            assert (frame[f"sparsity/{split}/{name}/rows"] == n * channels).all()
            for column in SparsityRecord._fields[3:]:
                assert f"sparsity/{split}/{name}/{column}" in frame
        expected_zero_fraction = (a <= 0).double().mean().item()
        got = frame[f"sparsity/{split}/net.1/zero_fraction"]
        assert got.tolist() == pytest.approx([expected_zero_fraction] * 2, rel=1e-9)
    assert callback.result.split == "val" and callback.result.test_loss_min_epoch == 0
    assert isinstance(callback.result.message, str)
    assert {n: len(m._forward_hooks) for n, m in module.named_modules()} == hooks_before


def test_the_penalty_is_added_to_the_training_loss(tmp_path):
    """Deterministic: with a loss of penalty only and a small learning rate, gradient
    descent on the penalty lowers the training sparsity from epoch to epoch; without the
    penalty nothing moves the weights and the values stay equal."""
    train, val = loaders(16, 4)
    curves = {}
    for weight in (0.0, 1.0):
        module = Net(lr=0.05, ce_weight=0.0)
        callback = SparsityCallback(penalty=weight)
        trainer(tmp_path / str(weight), epochs=3, devices=1, callbacks=[callback]).fit(
            module, train, val
        )
        curves[weight] = logged(tmp_path / str(weight))["sparsity/train/net.3/sparsity"].tolist()
        assert "training_step" not in module.__dict__  # the wrapper is gone after fit
    assert curves[0.0][0] == curves[0.0][1] == curves[0.0][2]
    assert curves[1.0][0] > curves[1.0][1] > curves[1.0][2]


def test_under_the_ddp_strategy_every_sample_is_counted_once(tmp_path):
    train, val = loaders(10, 6, batch=2)
    callback = SparsityCallback(penalty=0.1)
    trainer(tmp_path, epochs=1, devices=2, strategy="ddp_spawn", callbacks=[callback]).fit(
        Net(lr=0.0), train, val
    )
    frame = logged(tmp_path)  # written by rank 0 after the monitor's all-reduce
    for name, channels in CHANNELS.items():
        assert frame[f"sparsity/train/{name}/rows"].tolist() == [10 * channels]
        assert frame[f"sparsity/val/{name}/rows"].tolist() == [6 * channels]
