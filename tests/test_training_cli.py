"""`sparsity-ext train` and `sparsity-ext plot`: the files of a run, and bad training data."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from sparsity_ext.app import loop
from sparsity_ext.app.run_files import read_run
from sparsity_ext_cli import main

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
    assert not list(out.glob(".*")), "a temporary file of an atomic write was left behind"
    run = read_run(out)  # every file passes the checks of `sparsity-ext plot`
    assert len(run.history) == epochs * 2 * layers and len(run.channel_maps) == layers
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


def bad_cifar10_batches():
    """(what is pickled into data_batch_2, the message after the file's name)."""
    pixels = np.zeros((4, 3072), dtype=np.uint8)
    labels = [0, 1, 2, 3]
    invalid = "is not a valid CIFAR-10 batch: "
    return [
        ({b"data": pixels, b"labels": [0, 1, 10, 2]},
         invalid + "labels must lie in 0-9, got 0 to 10"),
        ({b"data": pixels, b"labels": [0, -1, 3, 2]},
         invalid + "labels must lie in 0-9, got -1 to 3"),
        ({b"data": pixels, b"labels": [0, 1, 2]}, invalid + "4 images but labels of shape (3,)"),
        ({b"data": pixels, b"labels": [0.0, 1.0, 2.0, 3.0]},
         invalid + "labels must be whole numbers 0-9, got float64"),
        ({b"data": pixels.astype(np.float32) / 255, b"labels": labels},
         invalid + "pixels must be whole numbers 0-255 (uint8), got float32"),
        ({b"data": pixels.astype(np.int16) - 1, b"labels": labels},
         invalid + "pixels must lie in 0-255, got -1 to -1"),
        ({b"data": np.full((4, 3072), 256), b"labels": labels},
         invalid + "pixels must lie in 0-255, got 256 to 256"),
        ({b"data": pixels[:, :3000], b"labels": labels},
         invalid + "data must have shape (images, 3072), got (4, 3000)"),
        ({b"data": pixels[:0], b"labels": []},
         invalid + "data must have shape (images, 3072), got (0, 3072)"),
        ({b"data": pixels, b"labels": [[0], [1, 2], [3], [4]]},
         invalid + "data or labels is not an array"),
        ({b"data": pixels}, "is not a CIFAR-10 python batch (no data and labels entries)"),
        ([pixels, labels], "is not a CIFAR-10 python batch (no data and labels entries)"),
    ]  # fmt: skip


def test_bad_training_data_exits_2_naming_the_file_before_any_model_is_built(
    tmp_path, capsys, monkeypatch
):
    built = []
    monkeypatch.setattr(loop, "build_model", lambda *args: built.append(args))
    (tmp_path / "empty").mkdir()
    write_fake_cifar10(tmp_path / "partial", per_batch=2)
    (tmp_path / "partial" / "test_batch").unlink()
    write_fake_cifar10(tmp_path / "corrupt", per_batch=2)
    (tmp_path / "corrupt" / "data_batch_3").write_bytes(b"not a pickle")
    cases = [
        (["--dataset", "cifar10"], "--dataset cifar10 needs --data-dir"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "missing")],
         "CIFAR-10 not found in"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty")], "data_batch_1"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "partial")], "test_batch"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "corrupt")],
         f"{tmp_path / 'corrupt' / 'data_batch_3'} is not a CIFAR-10 python batch"),
        (["--train-size", "5000"], "--train-size for digits must be between 1 and 1796"),
    ]  # fmt: skip
    for i, (batch, message) in enumerate(bad_cifar10_batches()):
        folder = tmp_path / f"bad{i}"
        write_fake_cifar10(folder, per_batch=4)
        with open(folder / "data_batch_2", "wb") as f:
            pickle.dump(batch, f)
        cases.append((["--dataset", "cifar10", "--data-dir", str(folder)],
                      f"{folder / 'data_batch_2'} {message}"))
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: CUDA is not available"))
    for args, message in cases:
        assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("sparsity-ext train: error: ") and message in err, (args, err)
    assert built == [] and not (tmp_path / "run").exists()
