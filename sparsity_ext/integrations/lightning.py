"""PyTorch Lightning callback: monitor (and optionally penalise) activation sparsity.

Importing this module imports ``lightning``; nothing else in sparsity_ext does.

    from sparsity_ext.integrations.lightning import SparsityCallback

    trainer = lightning.Trainer(callbacks=[SparsityCallback(penalty=0.1)], ...)
    trainer.fit(module, train_loader, val_loader)

Per epoch every record column of every monitored layer call is logged through the
Trainer's loggers (TensorBoard, CSV, MLflow, W&B, ...) as
``sparsity/{split}/{layer}/{column}`` at the epoch's global step, with the splits
``train``, ``val`` and ``test``. Under a DDP strategy the monitor all-reduces its sums,
so every rank holds the values over all ranks' samples; rank 0's loggers write them.
At the end of ``fit`` the overfitting rule (:func:`sparsity_ext.overfitting_warning`)
runs on the history and the per-epoch validation loss (``loss_key``); its outcome is in
:attr:`SparsityCallback.result` and in a rank-0 message.
"""

from __future__ import annotations

import math

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sparsity_ext.integrations.lightning needs PyTorch Lightning: "
        'pip install "sparsity_ext[lightning]"'
    ) from error

import torch

from ..monitor import ChannelDim, LayerSpec, SparsityMonitor, SparsityPenalty, SparsityRecord

__all__ = ["LOGGED_COLUMNS", "SparsityCallback"]

LOGGED_COLUMNS = SparsityRecord._fields[3:]  # every measured column, and rows


class _PenalisedStep:
    """``training_step`` plus the penalty on the loss it returns (a tensor or a dict's
    ``"loss"``). An object, not a closure, so the module stays picklable."""

    def __init__(self, step, penalty: SparsityPenalty):
        self.step = self.__wrapped__ = step  # __wrapped__: Lightning's is_overridden reads it
        self.penalty = penalty

    def __call__(self, *args, **kwargs):
        out = self.step(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out + self.penalty()
        if isinstance(out, dict) and "loss" in out:
            return {**out, "loss": out["loss"] + self.penalty()}
        return out  # None (skip the batch) or manual optimisation: left alone


class SparsityCallback(pl.Callback):
    """Attach a :class:`~sparsity_ext.SparsityMonitor` to the LightningModule and log it.

    Args:
        layers, channel_dim: as for :class:`~sparsity_ext.SparsityMonitor` (default: every
            activation module of the LightningModule, axes by the monitor's rule).
        penalty: if > 0, ``penalty * mean sparsity`` of the monitored layer calls is added
            to the loss ``training_step`` returns (a tensor or a dict's ``"loss"``).
        normalize: the penalty's measure, ``"softmax"`` or ``"l1"``.
        loss_key: the per-epoch validation loss the overfitting rule reads from
            ``trainer.callback_metrics``.

    The sanity-check validation batches are not recorded.
    """

    def __init__(
        self,
        layers: LayerSpec = None,
        *,
        channel_dim: ChannelDim = None,
        penalty: float = 0.0,
        normalize: str = "softmax",
        loss_key: str = "val_loss",
    ):
        super().__init__()
        if not float(penalty) >= 0.0:
            raise ValueError(f"the penalty weight must be a number >= 0, got {penalty}")
        self.layers = layers
        self.channel_dim = channel_dim
        self.penalty_weight = float(penalty)
        self.normalize = normalize
        self.loss_key = loss_key
        self.monitor: SparsityMonitor | None = None
        self.penalty: SparsityPenalty | None = None
        self.losses: list[dict] = []  # {"epoch", "test_loss"} per training epoch
        self.result = None  # the overfitting rule's outcome after fit

    # -- attach / detach ----------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.monitor is not None:
            return
        self.monitor = SparsityMonitor(pl_module, self.layers, self.channel_dim)
        if self.penalty_weight > 0:
            self.penalty = SparsityPenalty(self.monitor, self.penalty_weight, self.normalize)
            pl_module.training_step = _PenalisedStep(pl_module.training_step, self.penalty)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.monitor is None:
            return
        self.monitor.remove()
        if isinstance(pl_module.__dict__.get("training_step"), _PenalisedStep):
            del pl_module.training_step
        self.monitor = self.penalty = None

    # -- which split a batch belongs to -------------------------------------------------
    def _begin(self, split: str, enabled: bool = True) -> None:
        self.monitor.split = split
        self.monitor.enabled = enabled
        self.monitor.start_pass()  # a step may run the network without the module's forward

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._begin("train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._begin("val", enabled=not trainer.sanity_checking)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._begin("test")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._begin("predict", enabled=False)

    # -- per epoch ----------------------------------------------------------------------
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Runs after the epoch's validation, so both splits are in, and on every rank.
        epoch = trainer.current_epoch
        self._close_epoch(trainer, epoch)
        loss = trainer.callback_metrics.get(self.loss_key)
        self.losses.append({"epoch": epoch, "test_loss": float(loss) if loss is not None
                            else math.nan})  # fmt: skip

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit":  # trainer.validate(): no training epoch closes it
            self._close_epoch(trainer, trainer.current_epoch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._close_epoch(trainer, trainer.current_epoch)

    def _close_epoch(self, trainer, epoch: int) -> list[SparsityRecord]:
        records = self.monitor.end_epoch(epoch)  # a collective: every rank calls it
        metrics = {
            f"sparsity/{r.split}/{r.layer}/{column}": float(getattr(r, column))
            for r in records
            for column in LOGGED_COLUMNS
        }
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "epoch": epoch}, step=trainer.global_step)
        return records

    def on_fit_end(self, trainer, pl_module) -> None:
        import pandas as pd

        from ..overfitting import overfitting_warning

        history = pd.DataFrame(self.monitor.history, columns=SparsityRecord._fields)
        split = "val" if (history["split"] == "val").any() else "train"
        metrics = pd.DataFrame(self.losses, columns=["epoch", "test_loss"])
        self.result = overfitting_warning(history, metrics, split=split)
        (rank_zero_warn if self.result.overfitting else rank_zero_info)(self.result.message)
