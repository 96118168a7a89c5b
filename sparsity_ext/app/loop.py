"""The main job: train a small CNN while monitoring its layer-wise sparsity.

The training loop of ``sparsity-ext train``. Works in a single process or under
``torchrun`` (DistributedDataParallel; only rank 0 writes).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .. import distributed
from ..early_stopping import SparsityEarlyStopping
from ..monitor import SparsityMonitor, SparsityPenalty, SparsityRecord
from ..overfitting import overfitting_warning
from .data import Splits, load_dataset, with_label_noise
from .errors import ConfigError
from .models import build_model
from .outputs import summarise, write_outputs

__all__ = ["TrainConfig", "resolve_device", "train"]

CHANNEL_MAP_SAMPLES = 32  # test samples whose per-channel sparsity maps are saved and drawn
OPTIMIZERS = ("sgd", "adam")
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
SGD_MOMENTUM = 0.9
# Measures the online signal can watch (history columns); the ones present are all tracked.
SIGNAL_MEASURES = ("sparsity", "sparsity_l1")


@dataclass
class TrainConfig:
    """Everything a run depends on; written to summary.json. ``batch_size`` is per process.

    The default is a setting that overfits in a known way, in 1-2 min on 2 CPU cores: 1000
    training digits with 30% of their labels replaced by wrong ones, SGD (lr 0.01, momentum
    0.9), batch 32, 60 epochs. The network first learns the clean majority (test loss falls
    to its minimum near epoch 20), then memorises the wrong labels (train loss keeps
    falling; the test loss is about twice its minimum by epoch 60; more epochs add time,
    not information). ``lr=None`` takes :data:`DEFAULT_LR` of the optimizer.
    """

    out: str = "runs/sparsity"
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "vgg"
    epochs: int = 60
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float | None = None
    label_noise: float = 0.3
    penalty: float = 0.0
    penalty_normalize: str = "softmax"
    early_stop_on_sparsity: str | None = None
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
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: not a compute device (try cpu, cuda, cuda:1)")
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

    Outputs: history.csv (the fields of SparsityRecord), metrics.csv
    (epoch, train_loss, test_loss, train_acc, test_acc), summary.json, channel_maps.npz,
    the PNG plots, and TensorBoard events when tensorboard is installed.
    Returns the summary (the same dict on every rank).
    """
    if not config.penalty >= 0:
        raise ConfigError(f"--penalty must be >= 0, got {config.penalty}")
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    if config.early_stop_on_sparsity not in (None, *_signal_measures()):
        raise ConfigError(
            f"--early-stop-on-sparsity must be one of {', '.join(_signal_measures())}, "
            f"got {config.early_stop_on_sparsity!r}"
        )
    device = resolve_device(config.device)
    started_group = distributed.init_from_env(device)
    try:
        return _train(config, device)
    finally:
        if started_group:  # a caller's own process group stays up
            distributed.shutdown()


def _signal_measures() -> list[str]:
    """The :data:`SIGNAL_MEASURES` that the monitor's records carry."""
    return [m for m in SIGNAL_MEASURES if m in SparsityRecord._fields]


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
    if config.lr is None:  # summary.json records the rate used
        config = dataclasses.replace(config, lr=DEFAULT_LR[config.optimizer])
    rank, world = distributed.rank(), distributed.world_size()
    main_process = rank == 0
    out = Path(config.out)
    torch.manual_seed(config.seed)
    data = load_dataset(
        config.dataset, config.data_dir, config.train_size, config.test_size, config.seed
    )
    data = with_label_noise(data, config.label_noise, config.seed)
    model = build_model(
        config.model, data.train_x.shape[1], data.num_classes, data.train_x.shape[-1]
    )
    model.to(device)
    monitor = SparsityMonitor(model)
    penalty = (
        SparsityPenalty(monitor, config.penalty, normalize=config.penalty_normalize)
        if config.penalty > 0
        else None
    )
    net = (
        nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if world > 1
        else model
    )
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=SGD_MOMENTUM)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    # The online signal, on the training split, for each measure; it never looks at test data.
    signals = {m: SparsityEarlyStopping(m, "train") for m in _signal_measures()}
    stopped_at = None

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
        for signal in signals.values():
            signal.update(epoch, records, train_loss)
        _log_epoch(writer, epoch, row, records)
        test_sparsity = [r.sparsity for r in records if r.split == "test"]
        epochs_bar.set_postfix(
            train_loss=f"{train_loss:.3f}",
            test_loss=f"{test_loss:.3f}",
            test_acc=f"{test_acc:.3f}",
            sparsity=f"{sum(test_sparsity) / max(len(test_sparsity), 1):.3f}",
        )
        if config.early_stop_on_sparsity and signals[config.early_stop_on_sparsity].fired:
            stopped_at = epoch
            break

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
    warning = overfitting_warning(monitor.history, metrics_rows)
    summary = summarise(
        config, device, world, metrics, history, warning, time.perf_counter() - started
    )
    summary["online_signal"] = {
        "stopped_at_epoch": stopped_at,
        **{measure: signal.state() for measure, signal in signals.items()},
    }
    if main_process:
        write_outputs(out, history, metrics, summary, channel_maps)
        print(warning.message)
        for measure, signal in signals.items():
            fired = signal.fired_epoch
            print(
                f"online signal ({measure}, train split): "
                + (f"fired at epoch {fired}" if fired else "did not fire")
                + (f"; the run stopped there" if stopped_at else "")
            )
        print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return summary
