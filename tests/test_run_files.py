"""A run folder's files: atomic writing, and `sparsity-ext plot` refusing every malformed or
incomplete file with a message that names it."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from sparsity_ext.app.errors import RunFileError
from sparsity_ext.app.run_files import (
    HISTORY_COLUMNS,
    atomic_open,
    read_history,
    read_run,
)
from sparsity_ext_cli import main

LAYERS = ["features.0", "features.stage2_relu", "3"]  # "3": a layer name that looks like a number
EPOCHS = 4


def write_run(folder, extra_history_columns=()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A small valid run folder with random values; returns (history, metrics) as written."""
    g = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    rows = [
        {"epoch": e, "split": s, "layer": layer, "sparsity": g.random(), "entropy": 4 * g.random(),
         "rows": int(g.integers(1, 500)), **{c: g.random() for c in extra_history_columns}}
        for e in range(1, EPOCHS + 1) for s in ("train", "test") for layer in LAYERS
    ]  # fmt: skip
    rows[5]["sparsity"] = float("nan")  # a diverged layer's mean is NaN: written as empty
    history = pd.DataFrame(rows)
    metrics = pd.DataFrame({
        "epoch": range(1, EPOCHS + 1), "train_loss": g.random(EPOCHS),
        "test_loss": g.random(EPOCHS), "train_acc": g.random(EPOCHS), "test_acc": g.random(EPOCHS),
    })  # fmt: skip
    history.to_csv(folder / "history.csv", index=False)
    metrics.to_csv(folder / "metrics.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"overfitting": {"split": "test"}}))
    np.savez_compressed(folder / "channel_maps.npz",
                        **{layer: g.random((8, 5)).astype(np.float32) for layer in LAYERS})
    return history, metrics


def test_a_valid_run_reads_back_as_written(tmp_path):
    history, metrics = write_run(tmp_path, extra_history_columns=("zero_fraction", "entropy_l1"))
    run = read_run(tmp_path)
    pd.testing.assert_frame_equal(run.history, history, check_dtype=False)
    pd.testing.assert_frame_equal(run.metrics, metrics, check_dtype=False)
    assert list(run.history["layer"].unique()) == LAYERS  # text, not the number 3
    assert run.history["epoch"].dtype == np.int64 and run.history["rows"].dtype == np.int64
    assert run.summary == {"overfitting": {"split": "test"}}
    assert sorted(run.channel_maps) == sorted(LAYERS)


def test_every_proper_prefix_of_history_or_metrics_is_refused(tmp_path):
    """A file cut anywhere (mid-row, or between rows) is refused, with the file named."""
    write_run(tmp_path)
    for name in ("history.csv", "metrics.csv"):
        path = tmp_path / name
        text = path.read_bytes()
        for cut in range(len(text)):
            path.write_bytes(text[:cut])
            with pytest.raises(RunFileError) as error:
                read_run(tmp_path)
            assert str(tmp_path) in str(error.value) and name in str(error.value), (cut, error)
        path.write_bytes(text)
    read_run(tmp_path)  # the whole files are fine again


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("history.csv", b"", "history.csv is empty"),
        ("history.csv", b"\n \n", "history.csv is empty"),
        ("history.csv", b"epoch,split\x00\x01\x02\n", "history.csv is binary data"),
        ("history.csv", b"\x89PNG\r\n\x1a\n\xff\xfe\n", "history.csv is binary data"),
        ("history.csv", ",".join(HISTORY_COLUMNS).encode() + b"\n",
         "history.csv has a header but no rows"),
        ("history.csv", b"epoch,split,layer,sparsity,entropy,rows,accuracy\n1,test,a,0.5,1,2,0.1\n",
         "history.csv: the header has unknown accuracy"),
        ("history.csv", b"epoch,split,layer,entropy,rows\n1,test,a,1,2\n",
         "history.csv: the header lacks sparsity"),
        ("history.csv", b"epoch,split,layer,sparsity,sparsity,entropy,rows\n1,test,a,0.5,0.5,1,2\n",
         "history.csv: the header repeats a column"),
        ("history.csv", b"epoch,split,layer,sparsity,entropy,rows\n1,test,a,high,1,2\n",
         "history.csv line 2: column sparsity must be a number or empty, got 'high'"),
        ("history.csv", b"epoch,split,layer,sparsity,entropy,rows\n1.5,test,a,0.5,1,2\n",
         "history.csv line 2: column epoch must be a whole number, got '1.5'"),
        ("history.csv", b"epoch,split,layer,sparsity,entropy,rows\n1,,a,0.5,1,2\n",
         "history.csv line 2: column split must be non-empty text, got ''"),
        ("history.csv", b"epoch,split,layer,sparsity,entropy,rows\n1,test,a,0.5,1\n",
         "history.csv line 2 has 5 fields, the header 6"),
        ("history.csv", b"epoch,split,layer,sparsity,entropy,rows\n1,test,a,0.5,1,2\n"
                        b"1,test,a,0.4,1,2\n", "history.csv has more than one row for epoch 1"),
        ("metrics.csv", b"epoch,train_loss,test_loss,train_acc\n1,0.5,0.5,0.5\n",
         "metrics.csv: the header lacks test_acc"),
        ("metrics.csv", b"epoch,train_loss,test_loss,train_acc,test_acc\n2,1,1,1,1\n1,1,1,1,1\n",
         "metrics.csv: the epochs do not increase"),
        ("summary.json", b'{"overfitting": {"split": "test"', "summary.json is not valid JSON"),
        ("summary.json", b"[1, 2]", "summary.json must hold a JSON object, not list"),
        ("summary.json", b"{\"overfitting\": {\"split\": 3}}",
         "summary.json: 'overfitting' must be an object whose 'split' is text"),
        ("summary.json", b"{\"overfitting\": {\"split\": \"validation\"}}",
         "summary.json: the overfitting split 'validation' is not in history.csv"),
        ("summary.json", b"\x00\x01", "summary.json is binary data"),
        ("channel_maps.npz", b"PK\x03\x04 not really a zip", "channel_maps.npz is not a readable"),
        ("channel_maps.npz", b"", "channel_maps.npz is not a readable"),
    ],  # fmt: skip
)
def test_plot_refuses_a_bad_file_naming_it(tmp_path, capsys, file, content, message):
    write_run(tmp_path)
    (tmp_path / file).write_bytes(content)
    with pytest.raises(RunFileError) as error:
        read_run(tmp_path)
    assert f"{tmp_path}{os.sep}{message}" in str(error.value)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsity-ext plot: error: ") and str(error.value) in err
    assert not list(tmp_path.glob("*.png")), "plot drew from a bad file"


def test_plot_refuses_a_truncated_or_malformed_channel_maps_archive(tmp_path):
    write_run(tmp_path)
    path = tmp_path / "channel_maps.npz"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RunFileError, match="channel_maps.npz is not a readable .npz archive"):
        read_run(tmp_path)
    np.savez(path, layer=np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(RunFileError, match=r"channel_maps.npz: layer must be a 2-D float array"):
        read_run(tmp_path)
    np.savez(path, layer=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(RunFileError, match=r"got int64 of shape \(2, 3\)"):
        read_run(tmp_path)


def test_plot_refuses_folders_that_are_not_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    for folder, message in [
        (tmp_path / "empty", "is not a run folder: history.csv, metrics.csv missing"),
        (tmp_path / "a_file", f"{tmp_path / 'a_file'} is not a folder"),
        (tmp_path / "missing", f"{tmp_path / 'missing'} is not a folder"),
    ]:
        assert main(["plot", str(folder)]) == 2
        assert message in capsys.readouterr().err


def test_history_accepts_the_optional_columns_and_no_others(tmp_path):
    write_run(tmp_path, extra_history_columns=("sparsity_l1", "entropy_l1", "zero_fraction",
                                               "dead_fraction", "mean_activation"))  # fmt: skip
    assert len(read_history(tmp_path / "history.csv")) == EPOCHS * 2 * len(LAYERS)
    write_run(tmp_path, extra_history_columns=("l2_norm",))
    with pytest.raises(RunFileError, match="history.csv: the header has unknown l2_norm"):
        read_history(tmp_path / "history.csv")


def test_atomic_open_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path) as f:
            f.write("half of a new")
            raise KeyboardInterrupt  # an interrupted run
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left
    with atomic_open(path) as f:
        f.write("new,\r\n")
        assert path.read_text() == "old\n"  # unchanged until the block ends
    assert path.read_bytes() == b"new,\r\n"  # written as given (no newline translation)
    with atomic_open(tmp_path / "maps.npz", "wb") as f:
        np.savez_compressed(f, a=np.arange(3))
    assert np.load(tmp_path / "maps.npz")["a"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.npz", "metrics.csv"]
