"""`sparsity-ext train` and `sparsity-ext plot`: the files of a run, and bad arguments."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from sparsity_ext.app.cli import main

RUN_FILES = {
    "history.csv",
    "metrics.csv",
    "summary.json",
    "channel_maps.npz",
    "sparsity_curves.png",
    "sparsity_heatmap.png",
    "channel_maps.png",
}

try:
    import tensorboard  # noqa: F401

    HAS_TENSORBOARD = True
except ImportError:
    HAS_TENSORBOARD = False


def assert_not_blank(png) -> None:
    image = imread(png)[..., :3]
    assert image.shape[0] > 200 and image.shape[1] > 200
    drawn = (image < 0.9).any(axis=-1).mean()  # share of pixels that are not (near) white
    assert 0.02 < drawn < 0.9, (png, drawn)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20


def check_run(out, epochs: int, layers: int, world_size: int = 1) -> dict:
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns[:5]) == ["epoch", "split", "layer", "sparsity", "entropy"]
    assert len(history) == epochs * 2 * layers
    assert set(history["split"]) == {"train", "test"}
    assert history["sparsity"].between(0, 1).all() and (history["entropy"] >= 0).all()
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "test_loss", "train_acc", "test_acc"]
    assert list(metrics["epoch"]) == list(range(1, epochs + 1))
    assert metrics[["train_acc", "test_acc"]].stack().between(0, 1).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == world_size
    assert summary["config"]["epochs"] == epochs
    assert summary["overfitting"]["test_loss_min_epoch"] in range(1, epochs + 1)
    assert summary["final"]["test_loss"] == pytest.approx(metrics["test_loss"].iloc[-1])
    for png in RUN_FILES:
        if png.endswith(".png"):
            assert_not_blank(out / png)
    events = list(out.glob("tensorboard/events.out.tfevents.*"))
    assert bool(events) == HAS_TENSORBOARD
    return summary


def test_train_on_digits_writes_every_file_and_plot_redraws(tmp_path, capsys):
    out = tmp_path / "run"
    seed = int(torch.randint(0, 1000, ()))
    code = main(
        [
            "train",
            "--epochs",
            "2",
            "--out",
            str(out),
            "--seed",
            str(seed),
            "--penalty",
            "0.1",
            "--train-size",
            "120",
            "--test-size",
            "200",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    summary = check_run(out, epochs=2, layers=4)
    assert summary["config"]["penalty"] == 0.1 and summary["config"]["seed"] == seed
    assert summary["overfitting"]["message"] in printed
    for png in out.glob("*.png"):
        png.unlink()
    assert main(["plot", str(out)]) == 0
    for name in ("sparsity_curves.png", "sparsity_heatmap.png", "channel_maps.png"):
        assert_not_blank(out / name)


def write_fake_cifar10(folder, per_batch: int) -> None:
    folder.mkdir(parents=True)
    g = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": g.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
            b"labels": list(g.integers(0, 10, per_batch)),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_train_resnet_on_a_local_cifar10_folder(tmp_path):
    write_fake_cifar10(tmp_path / "data" / "cifar-10-batches-py", per_batch=8)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "data"),
            "--model",
            "resnet",
            "--epochs",
            "1",
            "--train-size",
            "24",
            "--test-size",
            "8",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    history = pd.read_csv(out / "history.csv")
    # stem + two ReLUs in each of the stages at 32, 16, 8 and 4 pixels
    assert history["layer"].nunique() == 9
    check_run(out, epochs=1, layers=9)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsity_ext", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["--penalty", "-0.5"], "--penalty: must be >= 0.0, got -0.5"),
        (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
        (["--lr", "abc"], "--lr: expected a number > 0.0, got 'abc'"),
    ],
)
def test_bad_arguments_exit_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_and_devices_exit_with_a_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    write_fake_cifar10(tmp_path / "partial", per_batch=2)
    (tmp_path / "partial" / "test_batch").unlink()
    write_fake_cifar10(tmp_path / "corrupt", per_batch=2)
    (tmp_path / "corrupt" / "data_batch_3").write_bytes(b"not a pickle")
    cases = [
        (["--dataset", "cifar10"], "--dataset cifar10 needs --data-dir"),
        (
            ["--dataset", "cifar10", "--data-dir", str(tmp_path / "missing")],
            "CIFAR-10 not found in",
        ),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty")], "data_batch_1"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "partial")], "test_batch"),
        (
            ["--dataset", "cifar10", "--data-dir", str(tmp_path / "corrupt")],
            "is not a CIFAR-10 python batch",
        ),
        (["--device", "tpu-ish"], "is not a device name"),
        (["--train-size", "5000"], "--train-size for digits must be between 1 and 1796"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for args, message in cases:
        assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("sparsity-ext train: error: ") and message in err, (args, err)
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "is not a run folder: history.csv, metrics.csv missing" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_module_entry_point_reports_errors_without_a_traceback(tmp_path):
    for args in (
        ["train", "--penalty", "-1"],
        ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path)],
    ):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "error:" in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_bench_rejects_bad_arguments_with_a_message(monkeypatch, capsys):
    for args, message in (
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--repeats", "0"], "--repeats: must be >= 1, got 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, args
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
