"""The data sets of ``sparsity-ext train``: scikit-learn's bundled 8x8 digits and CIFAR-10
from a local folder (never downloaded), as normalised tensors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from .errors import ConfigError

__all__ = [
    "DATASETS",
    "DIGITS_TRAIN_SIZE",
    "Splits",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "with_label_noise",
]

DIGITS_TRAIN_SIZE = 1000  # of 1797 images; the other 797 are the test split


class Splits(NamedTuple):
    """Normalised image tensors ``(N, C, H, W)`` float32 and int64 labels ``(N,)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int



def _subset(x: np.ndarray, y: np.ndarray, size: int | None, rng: np.random.Generator):
    if size is None or size >= len(y):
        return x, y
    keep = rng.permutation(len(y))[:size]
    return x[keep], y[keep]


def _normalise(train_x: np.ndarray, test_x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel standardisation with the training split's mean and std."""
    mean = train_x.mean(axis=(0, 2, 3), keepdims=True)
    std = train_x.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return (
        torch.from_numpy(((train_x - mean) / std).astype(np.float32)),
        torch.from_numpy(((test_x - mean) / std).astype(np.float32)),
    )


def load_digits(
    data_dir: str | None, train_size: int | None, test_size: int | None, seed: int
) -> Splits:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split at random.

    Default: :data:`DIGITS_TRAIN_SIZE` training images, every other image for testing.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_train = DIGITS_TRAIN_SIZE if train_size is None else train_size
    if not 0 < n_train < len(y):
        raise ConfigError(
            f"--train-size for digits must be between 1 and {len(y) - 1}, got {n_train}"
        )
    train_idx, test_idx = order[:n_train], order[n_train:]
    test_x, test_y = _subset(x[test_idx], y[test_idx], test_size, rng)
    train_x, test_x = _normalise(x[train_idx], test_x)
    return Splits(train_x, torch.from_numpy(y[train_idx]), test_x, torch.from_numpy(test_y), 10)


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar10_folder(data_dir: str | None) -> Path:
    if data_dir is None:
        raise ConfigError("--dataset cifar10 needs --data-dir DIR (this command never downloads)")
    for folder in (Path(data_dir), Path(data_dir) / "cifar-10-batches-py"):
        if all((folder / name).is_file() for name in CIFAR10_FILES):
            return folder
    raise ConfigError(
        f"CIFAR-10 not found in {data_dir}: expected the files {', '.join(CIFAR10_FILES)} of the "
        f"python version (cifar-10-python.tar.gz, extracted) in that folder or in its "
        f"cifar-10-batches-py/ subfolder"
    )


CIFAR10_IMAGE_SIZE = 3 * 32 * 32  # values per image: 3 colour planes of 32 x 32, row-major
CIFAR10_CLASSES = 10


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch of cifar-10-python.tar.gz: a pickled dict whose ``data`` holds ``(n,
    3072)`` pixels 0-255 and ``labels`` n class numbers 0-9. Returns ``(n, 3, 32, 32)`` uint8
    pixels and ``(n,)`` int64 labels; anything else raises ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as error:  # noqa: BLE001 - unpickling garbage can raise almost anything
        raise ConfigError(f"{path} is not a CIFAR-10 python batch ({error})") from None
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
        raise ConfigError(f"{path} is not a CIFAR-10 python batch (no data and labels entries)")
    try:
        pixels, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except ValueError as error:  # ragged lists
        raise ConfigError(
            f"{path} is not a valid CIFAR-10 batch: data or labels is not an array ({error})"
        ) from None
    problem = None
    if pixels.ndim != 2 or pixels.shape[1] != CIFAR10_IMAGE_SIZE or len(pixels) == 0:
        problem = f"data must have shape (images, {CIFAR10_IMAGE_SIZE}), got {pixels.shape}"
    elif not np.issubdtype(pixels.dtype, np.integer):
        problem = f"pixels must be whole numbers 0-255 (uint8), got {pixels.dtype}"
    elif pixels.min() < 0 or pixels.max() > 255:
        problem = f"pixels must lie in 0-255, got {pixels.min()} to {pixels.max()}"
    elif labels.shape != (len(pixels),):
        problem = f"{len(pixels)} images but labels of shape {labels.shape}"
    elif not np.issubdtype(labels.dtype, np.integer):
        problem = f"labels must be whole numbers 0-9, got {labels.dtype}"
    elif labels.min() < 0 or labels.max() >= CIFAR10_CLASSES:
        problem = f"labels must lie in 0-9, got {labels.min()} to {labels.max()}"
    if problem:
        raise ConfigError(f"{path} is not a valid CIFAR-10 batch: {problem}")
    return pixels.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(
    data_dir: str | None, train_size: int | None, test_size: int | None, seed: int
) -> Splits:
    """CIFAR-10 from the extracted python batches in a local folder; never downloads.

    Default: a random 5000-image training subset (so that it overfits) and 2000 test images.
    """
    folder = _cifar10_folder(data_dir)
    parts = [_read_cifar10_batch(folder / name) for name in CIFAR10_FILES[:-1]]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar10_batch(folder / "test_batch")
    rng = np.random.default_rng(seed)
    train_x, train_y = _subset(train_x, train_y, 5000 if train_size is None else train_size, rng)
    test_x, test_y = _subset(test_x, test_y, 2000 if test_size is None else test_size, rng)
    train_t, test_t = _normalise(train_x.astype(np.float32) / 255, test_x.astype(np.float32) / 255)
    return Splits(
        train_t, torch.from_numpy(train_y), test_t, torch.from_numpy(test_y), CIFAR10_CLASSES
    )


def with_label_noise(data: Splits, rate: float, seed: int) -> Splits:
    """``data`` with symmetric noise on the training labels only (the test labels stay clean).

    Exactly ``round(rate * n)`` training samples, chosen at random, get a label drawn
    uniformly from the *other* ``num_classes - 1`` classes, so ``rate`` is the share of
    wrong labels. The draw depends only on ``seed`` (the same on every DDP rank).
    """
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"--label-noise must be in [0, 1), got {rate}")
    labels = data.train_y.clone()
    n_noisy = round(rate * len(labels))
    if n_noisy == 0:
        return data
    rng = np.random.default_rng([seed, 1])  # its own stream: the split's draw stays the same
    chosen = torch.from_numpy(rng.permutation(len(labels))[:n_noisy])
    shift = torch.from_numpy(rng.integers(1, data.num_classes, n_noisy))
    labels[chosen] = (labels[chosen] + shift) % data.num_classes  # never the true class
    return data._replace(train_y=labels)


DATASETS: dict[str, Callable[..., Splits]] = {"digits": load_digits, "cifar10": load_cifar10}


def load_dataset(
    name: str,
    data_dir: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> Splits:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](data_dir, train_size, test_size, seed)
