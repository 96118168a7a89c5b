"""SparsityMonitor and `sparsity-ext train` under torch.distributed: 2 CPU processes, gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsity_ext.monitor import SparsityMonitor, SparsityPenalty, SparsityRecord
from sparsity_ext.app.models import SmallVGG

WORLD = 2


def make_data(seed: int) -> dict[str, torch.Tensor]:
    """An odd number of samples per split, so the ranks' shards differ in size."""
    g = torch.Generator().manual_seed(seed)
    # Even samples (rank 0's shard) 5x larger than odd ones: the shards' means differ.
    scale = 1 + 4 * (torch.arange(11) % 2 == 0).float().view(-1, 1, 1, 1)
    return {
        "train": torch.randn(11, 2, 8, 8, generator=g) * scale,
        "test": torch.randn(7, 2, 8, 8, generator=g),
        "val": torch.randn(3, 2, 8, 8, generator=g),
    }


def run_epoch(model, monitor, data: dict[str, torch.Tensor], rank: int, world: int, batch: int):
    """Rank ``r`` sees samples r, r + world, ... of each split; rank 0 alone sees all of "val"."""
    penalty = SparsityPenalty(monitor, 1.0)
    for split, x in data.items():
        if split == "val" and rank != 0:
            continue
        shard = x if split == "val" else x[rank::world]
        monitor.split = split
        model.train(split == "train")
        with torch.set_grad_enabled(split == "train"):
            for chunk in shard.split(batch):
                out = model(chunk)
                if split == "train":
                    (out.square().mean() + penalty()).backward()
    return monitor.end_epoch(5)


def monitor_worker(rank: int, world: int, init_file: str, result_file: str, seed: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(seed)
        model = SmallVGG(2, 10, 8)
        monitor = SparsityMonitor(model)
        records = run_epoch(model, monitor, make_data(seed), rank, world, batch=2)
        torch.save(records, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_reduced_values_equal_a_single_process_run_over_the_same_samples(tmp_path):
    seed = 1234
    mp.spawn(
        monitor_worker,
        args=(WORLD, str(tmp_path / "init"), str(tmp_path / "records"), seed),
        nprocs=WORLD,
        join=True,
    )
    per_rank = [torch.load(tmp_path / f"records.{r}", weights_only=False) for r in range(WORLD)]
    assert per_rank[0] == per_rank[1]  # every rank gets the reduced values

    torch.manual_seed(seed)
    model = SmallVGG(2, 10, 8)
    expected = run_epoch(model, SparsityMonitor(model), make_data(seed), rank=0, world=1, batch=5)
    got = per_rank[0]
    assert [(r.split, r.layer, r.rows) for r in got] == [
        (r.split, r.layer, r.rows) for r in expected
    ]
    for g, e in zip(got, expected):
        for field in SparsityRecord._fields[3:]:
            assert getattr(g, field) == pytest.approx(getattr(e, field), rel=1e-5, abs=1e-7), (
                field, g, e)  # fmt: skip

    # An average of the two ranks' averages is a different number: the test can tell them apart.
    torch.manual_seed(seed)
    model = SmallVGG(2, 10, 8)
    shard_means = []
    for rank in range(WORLD):
        with SparsityMonitor(model) as monitor:
            model(make_data(seed)["train"][rank::WORLD])
            shard_means.append([r.sparsity for r in monitor.end_epoch(0)])
    averaged = torch.tensor(shard_means).mean(0)
    exact = torch.tensor([r.sparsity for r in expected if r.split == "train"])
    assert ((averaged - exact).abs() / exact).max() > 1e-3


def test_torchrun_train_with_the_penalty(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        "-m", "sparsity_ext", "train", "--epochs", "2", "--train-size", "64", "--test-size", "101",
        "--batch-size", "16", "--penalty", "0.5", "--device", "cpu", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("overfitting") == 1  # only rank 0 prints and writes
    names = {p.name for p in out.iterdir()} - {"tensorboard"}
    assert names == {
        "history.csv", "metrics.csv", "summary.json", "channel_maps.npz",
        "sparsity_curves.png", "sparsity_heatmap.png", "channel_maps.png",
    }  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["config"]["penalty"] == 0.5
    history = pd.read_csv(out / "history.csv")
    channels = {"features.stage1_relu1": 32, "features.stage1_relu2": 32,
                "features.stage2_relu1": 64, "features.stage2_relu2": 64}  # fmt: skip
    for row in history.itertuples():
        # every test sample counted exactly once over both ranks, every training sample once
        assert row.rows == (101 if row.split == "test" else 64) * channels[row.layer]
