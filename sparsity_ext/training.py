"""The main job: train a small CNN while monitoring its layer-wise sparsity.

Data sets, models and the training loop of ``sparsity-ext train``. The defaults are
picked to overfit visibly within minutes on a laptop CPU: a small training split of
scikit-learn's bundled 8x8 digits, no augmentation, no weight decay, Adam. Works in a
single process or under ``torchrun`` (DistributedDataParallel; only rank 0 writes).
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .monitor import SparsityMonitor, SparsityPenalty, SparsityRecord
from .overfitting import OverfittingWarning, overfitting_warning

__all__ = [
    "DATASETS",
    "MODELS",
    "ConfigError",
    "SmallResNet",
    "SmallVGG",
    "Splits",
    "TrainConfig",
    "build_model",
    "load_dataset",
    "train",
]

CHANNEL_MAP_SAMPLES = 32  # test samples whose per-channel sparsity maps are saved and drawn


class ConfigError(ValueError):
    """The run cannot start as configured (data folder missing or malformed, device not
    available); the message says why and what to pass instead."""


class Splits(NamedTuple):
    """Normalised image tensors ``(N, C, H, W)`` float32 and int64 labels ``(N,)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


# ---------------------------------------------------------------------------- data sets


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

    Default: 300 training images, every other image for testing.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_train = 300 if train_size is None else train_size
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


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, TypeError, KeyError, ValueError) as error:
        raise ConfigError(f"{path} is not a CIFAR-10 python batch ({error})") from None
    return x, y


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
    return Splits(train_t, torch.from_numpy(train_y), test_t, torch.from_numpy(test_y), 10)


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


# ---------------------------------------------------------------------------- models


def _conv_unit(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]


class SmallVGG(nn.Module):
    """VGG-style CNN: stages of two 3x3 conv + ReLU and a 2x2 max-pool, then two FC layers.

    Stages are added while the feature map is at least 4x4 (8x8 input: 2 stages at 8x8
    and 4x4; 32x32: 4 stages); widths ``base_width * 2**stage``, capped at 256.
    Input ``(N, in_channels, S, S)``, output logits ``(N, num_classes)``. Module names
    (``stage1.relu2``, ...) are the layer names in the monitor's records.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, base_width: int = 32):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        size, in_ch, stage = image_size, in_channels, 0
        while size >= 4:
            stage += 1
            width = min(base_width * 2 ** (stage - 1), 256)
            for unit in (1, 2):
                conv, relu = _conv_unit(in_ch, width)
                layers[f"stage{stage}_conv{unit}"], layers[f"stage{stage}_relu{unit}"] = conv, relu
                in_ch = width
            layers[f"stage{stage}_pool"] = nn.MaxPool2d(2)
            size //= 2
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(in_ch * size * size, 128),
                fc1_relu=nn.ReLU(),
                fc2=nn.Linear(128, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm with an identity (or 1x1 strided) shortcut; own ReLUs."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-style CNN: conv stem, one BasicBlock per stage (stride 2 after the first),
    global average pooling, one FC layer. Stages as in :class:`SmallVGG` (down to 4x4).
    Input ``(N, in_channels, S, S)``, output logits ``(N, num_classes)``.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, base_width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, base_width, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(base_width),
                relu=nn.ReLU(),
            )
        )
        blocks: OrderedDict[str, nn.Module] = OrderedDict(
            stage1=BasicBlock(base_width, base_width, 1)
        )
        size, in_ch = image_size, base_width
        while size // 2 >= 4:
            width = min(in_ch * 2, 256)
            blocks[f"stage{len(blocks) + 1}"] = BasicBlock(in_ch, width, 2)
            in_ch, size = width, size // 2
        self.stages = nn.Sequential(blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


MODELS: dict[str, type[nn.Module]] = {"vgg": SmallVGG, "resnet": SmallResNet}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](in_channels, num_classes, image_size)


# ---------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Everything a run depends on; written to summary.json. ``batch_size`` is per process."""

    out: str = "runs/sparsity"
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "vgg"
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    penalty: float = 0.0
    seed: int = 0
    device: str = "auto"
    train_size: int | None = None
    test_size: int | None = None
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. Under torchrun, CUDA means ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"--device {name!r} is not a device name (try cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample exactly once over all ranks, unpadded,
    so that summed evaluation metrics are exact (DistributedSampler pads with repeats)."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = range(rank, length, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochTotals:
    """Loss and accuracy sums kept on the device; one all-reduce and host sync per epoch."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x n, correct
        self.count = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        with torch.no_grad():
            self.sums += torch.stack(
                (
                    loss.detach().double() * labels.numel(),
                    (logits.argmax(1) == labels).sum().double(),
                )
            )
        self.count += labels.numel()

    def reduce(self) -> tuple[float, float]:
        """(mean loss, accuracy) over all ranks' samples."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sums.device)
        loss, correct, count = distributed.all_reduce_sum(torch.cat((self.sums, count))).tolist()
        return loss / max(count, 1), correct / max(count, 1)


def _run_epoch(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    optimizer: torch.optim.Optimizer | None,
    penalty: SparsityPenalty | None,
    desc: str,
    progress: bool,
) -> tuple[float, float]:
    """One pass over ``loader``; trains when an optimizer is given. Returns (loss, accuracy)."""
    training = optimizer is not None
    model.train(training)
    totals = EpochTotals(device)
    with torch.set_grad_enabled(training):
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if training:
                objective = loss + penalty() if penalty is not None else loss
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
            totals.add(logits, y, loss)
    return totals.reduce()


def _tensorboard_writer(out: Path):
    """A SummaryWriter under ``out/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _log_epoch(writer, epoch: int, metrics: dict, records) -> None:
    if writer is None:
        return
    for split in ("train", "test"):
        writer.add_scalar(f"loss/{split}", metrics[f"{split}_loss"], epoch)
        writer.add_scalar(f"accuracy/{split}", metrics[f"{split}_acc"], epoch)
    for record in records:
        writer.add_scalar(f"sparsity_{record.split}/{record.layer}", record.sparsity, epoch)
        writer.add_scalar(f"entropy_{record.split}/{record.layer}", record.entropy, epoch)
    writer.flush()


def train(config: TrainConfig) -> dict:
    """Run the job described by ``config``; rank 0 writes every output into ``config.out``.

    Outputs: history.csv (epoch, split, layer, sparsity, entropy, rows), metrics.csv
    (epoch, train_loss, test_loss, train_acc, test_acc), summary.json, channel_maps.npz,
    the PNG plots, and TensorBoard events when tensorboard is installed.
    Returns the summary (the same dict on every rank).
    """
    if not config.penalty >= 0:
        raise ConfigError(f"--penalty must be >= 0, got {config.penalty}")
    device = resolve_device(config.device)
    started_group = distributed.init_from_env(device)
    try:
        return _train(config, device)
    finally:
        if started_group:  # a caller's own process group stays up
            distributed.shutdown()


def _loaders(data: Splits, config: TrainConfig, rank: int, world: int):
    """Shuffled training batches (a DistributedSampler under DDP, ``batch_size`` per
    process) and unshuffled test batches, each rank its own unpadded shard."""
    train_set = TensorDataset(data.train_x, data.train_y)
    test_set = TensorDataset(data.test_x, data.test_y)
    if world > 1:
        sampler = DistributedSampler(train_set, shuffle=True, seed=config.seed)
        train_loader = DataLoader(train_set, config.batch_size, sampler=sampler)
    else:
        generator = torch.Generator().manual_seed(config.seed)
        train_loader = DataLoader(train_set, config.batch_size, shuffle=True, generator=generator)
    test_sampler = ShardSampler(len(test_set), rank, world)
    test_loader = DataLoader(test_set, max(config.batch_size, 256), sampler=test_sampler)
    return train_loader, test_loader


def _train(config: TrainConfig, device: torch.device) -> dict:
    started = time.perf_counter()
    rank, world = distributed.rank(), distributed.world_size()
    main_process = rank == 0
    out = Path(config.out)
    torch.manual_seed(config.seed)
    data = load_dataset(
        config.dataset, config.data_dir, config.train_size, config.test_size, config.seed
    )
    model = build_model(
        config.model, data.train_x.shape[1], data.num_classes, data.train_x.shape[-1]
    )
    model.to(device)
    monitor = SparsityMonitor(model)
    penalty = SparsityPenalty(monitor, config.penalty) if config.penalty > 0 else None
    net = (
        nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if world > 1
        else model
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)

    train_loader, test_loader = _loaders(data, config, rank, world)
    writer = _tensorboard_writer(out) if main_process else None
    progress = config.progress and main_process
    metrics_rows = []
    epochs_bar = tqdm(range(1, config.epochs + 1), desc="epochs", disable=not progress)
    for epoch in epochs_bar:
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train_loss, train_acc = _run_epoch(
            net,
            train_loader,
            device,
            optimizer=optimizer,
            penalty=penalty,
            desc=f"epoch {epoch} train",
            progress=progress,
        )
        # Evaluated without the DDP wrapper: ranks may hold unequal numbers of test batches.
        test_loss, test_acc = _run_epoch(
            model,
            test_loader,
            device,
            optimizer=None,
            penalty=None,
            desc=f"epoch {epoch} test",
            progress=progress,
        )
        records = monitor.end_epoch(epoch)
        row = {"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
               "train_acc": train_acc, "test_acc": test_acc}  # fmt: skip
        metrics_rows.append(row)
        _log_epoch(writer, epoch, row, records)
        test_sparsity = [r.sparsity for r in records if r.split == "test"]
        epochs_bar.set_postfix(
            train_loss=f"{train_loss:.3f}",
            test_loss=f"{test_loss:.3f}",
            test_acc=f"{test_acc:.3f}",
            sparsity=f"{sum(test_sparsity) / max(len(test_sparsity), 1):.3f}",
        )

    model.eval()
    with torch.no_grad(), monitor.capture() as channel_maps:
        model(data.test_x[:CHANNEL_MAP_SAMPLES].to(device))
    monitor.remove()
    if writer is not None:
        writer.close()

    history = pd.DataFrame(monitor.history, columns=SparsityRecord._fields)
    metrics = pd.DataFrame(
        metrics_rows, columns=["epoch", "train_loss", "test_loss", "train_acc", "test_acc"]
    )
    warning = overfitting_warning(history, metrics)
    summary = _summary(
        config, device, world, metrics, history, warning, time.perf_counter() - started
    )
    if main_process:
        _write_outputs(out, history, metrics, summary, channel_maps)
        print(warning.message)
        print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return summary


def _summary(
    config: TrainConfig,
    device: torch.device,
    world: int,
    metrics: pd.DataFrame,
    history: pd.DataFrame,
    warning: OverfittingWarning,
    seconds: float,
) -> dict:
    last = metrics.iloc[-1]
    final = {
        name: float(last[name]) for name in ("train_loss", "test_loss", "train_acc", "test_acc")
    }
    final["best_test_acc"] = float(metrics["test_acc"].max())
    final["min_test_loss"] = float(metrics["test_loss"].min())
    last_epoch = history[history["epoch"] == history["epoch"].max()]
    final["mean_sparsity"] = {
        split: float(group["sparsity"].mean()) for split, group in last_epoch.groupby("split")
    }
    return {
        "config": asdict(config),
        "world_size": world,
        "device": str(device),
        "torch_version": torch.__version__,
        "overfitting": warning.as_dict(),
        "final": final,
        "seconds": round(seconds, 2),
    }


def _write_outputs(
    out: Path,
    history: pd.DataFrame,
    metrics: pd.DataFrame,
    summary: dict,
    channel_maps: dict[str, torch.Tensor],
) -> None:
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    history.to_csv(out / "history.csv", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    np.savez_compressed(out / "channel_maps.npz", **{k: v.numpy() for k, v in channel_maps.items()})
    plots.plot_run(out)
