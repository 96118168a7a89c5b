"""The files of a run folder: their names and columns, atomic writing, and validated reading.

``sparsity-ext train`` writes, and ``sparsity-ext plot`` reads back:

- ``history.csv``: one row per (epoch, split, layer) with the columns
  :data:`HISTORY_COLUMNS` and any of :data:`OPTIONAL_HISTORY_COLUMNS`;
- ``metrics.csv``: one row per epoch with the columns :data:`METRICS_COLUMNS`;
- ``summary.json`` (optional for plotting): a JSON object;
- ``channel_maps.npz`` (optional): one 2-D float array (samples x channels) per layer.

Every file is written through :func:`atomic_open`, so an interrupted run leaves each file
whole or absent, never half-written. Every reader raises
:class:`~sparsity_ext.app.errors.RunFileError` naming the file and what is wrong.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, NamedTuple

import numpy as np
import pandas as pd

from .errors import RunFileError

__all__ = [
    "CHANNEL_MAPS_NPZ",
    "HISTORY_COLUMNS",
    "HISTORY_CSV",
    "METRICS_COLUMNS",
    "METRICS_CSV",
    "OPTIONAL_HISTORY_COLUMNS",
    "SUMMARY_JSON",
    "Run",
    "atomic_open",
    "read_channel_maps",
    "read_history",
    "read_metrics",
    "read_run",
    "read_summary",
]

HISTORY_CSV = "history.csv"
METRICS_CSV = "metrics.csv"
SUMMARY_JSON = "summary.json"
CHANNEL_MAPS_NPZ = "channel_maps.npz"

HISTORY_COLUMNS = ("epoch", "split", "layer", "sparsity", "entropy", "rows")
OPTIONAL_HISTORY_COLUMNS = (
    "sparsity_l1", "entropy_l1", "zero_fraction", "dead_fraction", "mean_activation",
)  # fmt: skip
METRICS_COLUMNS = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")

INTEGER_COLUMNS = {"epoch", "rows"}  # whole numbers, never missing
TEXT_COLUMNS = {"split", "layer"}  # non-empty text; every other column is a float (may be NaN)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a new file beside ``path`` for writing (``mode`` "w" or "wb"); when the block
    ends without an error, that file replaces ``path`` in one rename (``os.replace``), so a
    reader sees the old file or the whole new one. On an error the new file is removed."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    binary = "b" in mode
    try:
        # newline="": text goes out as written (the csv writers choose their line ends).
        with open(temporary, "xb" if binary else "x", newline=None if binary else "") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# --- reading -----------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The file's text; refuses an unreadable, empty or binary file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RunFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    if not data.strip():
        raise RunFileError(f"{path} is empty")
    try:
        if b"\0" not in data:
            return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    raise RunFileError(f"{path} is binary data, not a text file")


def _column(path: Path, name: str, texts: list[str]) -> list:
    """Convert one CSV column's texts to its type; the message names the first bad line."""
    if name in TEXT_COLUMNS:
        convert, kind = str, "non-empty text"
    elif name in INTEGER_COLUMNS:
        convert, kind = int, "a whole number"
    else:
        convert, kind = (lambda t: float(t) if t else float("nan")), "a number or empty"
    values = []
    for line, text in enumerate(texts, start=2):  # line 1 is the header
        try:
            value = convert(text)
        except ValueError:
            value = ""
        if value == "":
            raise RunFileError(f"{path} line {line}: column {name} must be {kind}, got {text!r}")
        values.append(value)
    return values


def _read_csv(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    """A strict CSV reader: header with every ``required`` column and nothing but those and
    ``optional`` ones, every line with exactly the header's fields, values of each column's
    type (:data:`INTEGER_COLUMNS`, :data:`TEXT_COLUMNS`, floats otherwise)."""
    text = _read_text(path)
    if not text.endswith("\n"):
        raise RunFileError(f"{path} ends in the middle of a line: the file is truncated")
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise RunFileError(f"{path} is not a valid CSV file ({error})") from None
    header, rows = lines[0], lines[1:]
    missing = [c for c in required if c not in header]
    unknown = [c for c in header if c not in required and c not in optional]
    if missing or unknown or len(set(header)) != len(header):
        expected = ", ".join(required) + (f" (and optionally {', '.join(optional)})"
                                          if optional else "")
        problem = "; ".join(filter(None, [
            missing and f"lacks {', '.join(missing)}",
            unknown and f"has unknown {', '.join(unknown)}",
            len(set(header)) != len(header) and "repeats a column",
        ]))  # fmt: skip
        raise RunFileError(f"{path}: the header {problem}; expected the columns {expected}")
    if not rows:
        raise RunFileError(f"{path} has a header but no rows")
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise RunFileError(
                f"{path} line {line} has {len(row)} fields, the header {len(header)}"
            )
    return pd.DataFrame(
        {name: _column(path, name, [row[i] for row in rows]) for i, name in enumerate(header)}
    )


def read_history(path: str | os.PathLike) -> pd.DataFrame:
    """``history.csv`` as a DataFrame; also refuses repeated (epoch, split, layer) rows and an
    epoch that lacks a (split, layer) pair the others have (a file cut between rows)."""
    path = Path(path)
    history = _read_csv(path, HISTORY_COLUMNS, OPTIONAL_HISTORY_COLUMNS)
    keys = ["epoch", "split", "layer"]
    repeated = history[history.duplicated(keys)]
    if len(repeated):
        epoch, split, layer = repeated.iloc[0][keys]
        raise RunFileError(f"{path} has more than one row for epoch {epoch}, {split}, {layer}")
    pairs = set(zip(history["split"], history["layer"]))
    for epoch, group in history.groupby("epoch", sort=True):
        lacking = pairs - set(zip(group["split"], group["layer"]))
        if lacking:
            split, layer = sorted(lacking)[0]
            raise RunFileError(
                f"{path} is incomplete: epoch {epoch} has no row for {split}, {layer} "
                f"({len(lacking)} (split, layer) pair(s) missing)"
            )
    return history


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """``metrics.csv`` as a DataFrame; epochs must increase."""
    path = Path(path)
    metrics = _read_csv(path, METRICS_COLUMNS)
    if not metrics["epoch"].is_monotonic_increasing or not metrics["epoch"].is_unique:
        raise RunFileError(f"{path}: the epochs do not increase from line to line")
    return metrics


def read_summary(path: str | os.PathLike) -> dict:
    """``summary.json`` as a dict; a JSON object whose ``overfitting.split``, if any, is text."""
    path = Path(path)
    try:
        summary = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise RunFileError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    if not isinstance(summary, dict):
        raise RunFileError(f"{path} must hold a JSON object, not {type(summary).__name__}")
    overfitting = summary.get("overfitting", {})
    if not isinstance(overfitting, dict) or not isinstance(overfitting.get("split", ""), str):
        raise RunFileError(f"{path}: 'overfitting' must be an object whose 'split' is text")
    return summary


def read_channel_maps(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``channel_maps.npz``: layer name -> 2-D float array (samples x channels)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            maps = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise RunFileError(f"{path} is not a readable .npz archive ({error})") from None
    for name, array in maps.items():
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            raise RunFileError(
                f"{path}: {name} must be a 2-D float array (samples x channels), "
                f"got {array.dtype} of shape {array.shape}"
            )
    return maps


class Run(NamedTuple):
    """What a run folder holds; ``summary`` and ``channel_maps`` are None when absent."""

    history: pd.DataFrame
    metrics: pd.DataFrame
    summary: dict | None
    channel_maps: dict[str, np.ndarray] | None


def _epoch_span(epochs) -> str:
    epochs = sorted(set(epochs))
    return f"{len(epochs)} epochs ({epochs[0]}-{epochs[-1]})"


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read and cross-check every file of a run folder (module doc): the history and the
    metrics cover the same epochs, and the summary's split is one of the history's."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunFileError(f"{run} is not a folder")
    missing = [name for name in (HISTORY_CSV, METRICS_CSV) if not (run / name).is_file()]
    if missing:
        raise RunFileError(f"{run} is not a run folder: {', '.join(missing)} missing")
    history = read_history(run / HISTORY_CSV)
    metrics = read_metrics(run / METRICS_CSV)
    if set(history["epoch"]) != set(metrics["epoch"]):
        raise RunFileError(
            f"{run}: {HISTORY_CSV} has {_epoch_span(history['epoch'])} but {METRICS_CSV} has "
            f"{_epoch_span(metrics['epoch'])}; one of them is incomplete"
        )
    summary = read_summary(run / SUMMARY_JSON) if (run / SUMMARY_JSON).is_file() else None
    split = (summary or {}).get("overfitting", {}).get("split")
    if split is not None and split not in set(history["split"]):
        raise RunFileError(
            f"{run / SUMMARY_JSON}: the overfitting split {split!r} is not in {HISTORY_CSV} "
            f"(splits: {', '.join(sorted(set(history['split'])))})"
        )
    maps_path = run / CHANNEL_MAPS_NPZ
    channel_maps = read_channel_maps(maps_path) if maps_path.is_file() else None
    return Run(history, metrics, summary, channel_maps)
