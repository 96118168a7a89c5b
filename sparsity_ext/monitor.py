"""Layer-wise sparsity monitor and the differentiable sparsity penalty.

:class:`SparsityMonitor` puts forward hooks on chosen modules of a model. Every hooked
output ``a`` of shape ``(N, C, *S)`` goes through the fused
:func:`sparsity_ext.channel_stats`; the monitor adds up the ``N * C`` per-row sparsity
and entropy values per (split, layer) on the activation's device (no host sync per
batch) and, at :meth:`SparsityMonitor.end_epoch`, turns the sums into one
:class:`SparsityRecord` per (epoch, split, layer): the mean over every sample and
channel seen in that epoch. Under ``torch.distributed`` the sums and row counts are
all-reduced before dividing, so the means are exact over all ranks' samples.

Per batch and layer the hook costs the op and two reductions that stay on the device;
the host sees the numbers once per epoch.

:class:`SparsityPenalty` reuses the same hooks: with a penalty attached, a hooked
output that requires grad is measured *with* autograd, the penalty keeps the graph-
connected layer means of the latest forward pass, and the monitor accumulates the very
same values detached, so the op runs once per layer and batch either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple, Union

import torch
from torch import nn

from . import distributed, ops, reference

__all__ = [
    "ACTIVATION_TYPES",
    "CONV_TYPES",
    "SparsityMonitor",
    "SparsityPenalty",
    "SparsityRecord",
    "default_layers",
]

# Modules whose outputs are "the output of a convolution block's activation".
ACTIVATION_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

LayerSpec = Union[None, Iterable[Union[str, nn.Module]], Mapping[str, nn.Module]]


class SparsityRecord(NamedTuple):
    """One epoch's mean over every (sample, channel) row a layer produced in one split."""

    epoch: int
    split: str
    layer: str
    sparsity: float
    entropy: float
    rows: int


def default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The feature-extraction layers of ``model``, by qualified name, in forward order.

    Rule: every activation module (:data:`ACTIVATION_TYPES`) of the model; if the model
    has none (its activations are functional calls), every convolution module
    (:data:`CONV_TYPES`) instead. Fully connected outputs have no spatial dimension,
    shape ``(N, F)``: the monitor skips any hooked output with fewer than 3 dims, so an
    activation after a linear layer is hooked but never recorded.
    """
    for kinds in (ACTIVATION_TYPES, CONV_TYPES):
        found = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
        if found:
            return found
    return {}


def _resolve_layers(model: nn.Module, layers: LayerSpec) -> dict[str, nn.Module]:
    if layers is None:
        chosen = default_layers(model)
    elif isinstance(layers, Mapping):
        chosen = dict(layers)
    else:
        by_name = dict(model.named_modules())
        by_module = {id(m): name for name, m in by_name.items()}
        chosen = {}
        for layer in layers:
            if isinstance(layer, str):
                if layer not in by_name:
                    known = ", ".join(n for n in by_name if n) or "(none)"
                    raise ValueError(f"model has no module named {layer!r}; its modules: {known}")
                chosen[layer] = by_name[layer]
            elif isinstance(layer, nn.Module) and id(layer) in by_module:
                chosen[by_module[id(layer)] or type(layer).__name__] = layer
            else:
                raise ValueError(f"expected module names or submodules of the model, got {layer!r}")
    if not chosen:
        raise ValueError(
            "no layers to monitor: the model has no activation or convolution modules; "
            "pass layers=[...] with the module names to hook"
        )
    return chosen


class SparsityMonitor:
    """Per-layer mean sparsity and entropy of a model's activations, per epoch and split.

    Args:
        model: the network (a ``DistributedDataParallel`` wrapper is unwrapped).
        layers: ``None`` for :func:`default_layers`, or module names / submodules, or a
            ``{name: module}`` mapping. Each hooked output of shape ``(N, C, *S)`` counts
            ``N * C`` rows; outputs with fewer than 3 dims or not floating point are skipped.

    The split of a batch is :attr:`split` if set, else ``"train"`` while the model is in
    training mode and ``"test"`` in eval mode. Use it in any loop::

        with SparsityMonitor(model) as monitor:
            for epoch in range(epochs):
                model.train(); ...   # batches recorded as "train"
                model.eval(); ...    # batches recorded as "test"
                records = monitor.end_epoch(epoch)

    All ranks of a process group must call :meth:`end_epoch` together (it all-reduces).
    """

    def __init__(self, model: nn.Module, layers: LayerSpec = None):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.layers = _resolve_layers(model, layers)
        self.split: str | None = None
        self.enabled = True
        self.history: list[SparsityRecord] = []
        # Set by SparsityPenalty: measure with autograd when the output requires grad.
        self.differentiable = False
        self._layer_index = {name: i for i, name in enumerate(self.layers)}
        self._sums: dict[str, list[list[torch.Tensor]]] = {}  # split -> layer -> batch sums
        self._rows: dict[str, list[int]] = {}  # split -> rows per layer
        self._graph_means: dict[str, list[torch.Tensor]] = {}  # latest forward, with grad
        self._capture: dict[str, torch.Tensor] | None = None
        self._handles = [
            module.register_forward_hook(self._hook_for(name))
            for name, module in self.layers.items()
        ]
        # A new forward pass starts a new penalty: drop the previous pass's graph values.
        self._handles.append(model.register_forward_pre_hook(lambda *_: self._graph_means.clear()))

    def __enter__(self) -> SparsityMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach every hook; the model is left exactly as before. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._graph_means.clear()

    def _hook_for(self, name: str):
        def hook(module, inputs, output):
            self._observe(name, output)

        return hook

    def _observe(self, name: str, output) -> None:
        if not (self.enabled and isinstance(output, torch.Tensor)):
            return
        if output.dim() < 3 or not output.is_floating_point():
            return
        if self.differentiable and torch.is_grad_enabled() and output.requires_grad:
            stats = ops.channel_stats(output)
            mean = stats.sparsity.mean(dtype=reference.accumulation_dtype(stats.sparsity.dtype))
            self._graph_means.setdefault(name, []).append(mean)
            sparsity, entropy = stats.sparsity.detach(), stats.entropy.detach()
        else:
            with torch.no_grad():
                stats = ops.channel_stats(output)
            sparsity, entropy = stats.sparsity, stats.entropy
        if self._capture is not None:
            self._capture[name] = sparsity.float().cpu()
            return
        self._accumulate(name, sparsity, entropy)

    def _accumulate(self, name: str, sparsity: torch.Tensor, entropy: torch.Tensor) -> None:
        """Append this output's two row sums (0-dim, on its device): two reductions per
        layer and batch, no host sync; they are added up once, in :meth:`end_epoch`."""
        split = self.split or ("train" if self.model.training else "test")
        if split not in self._sums:
            self._sums[split] = [[] for _ in self.layers]
            self._rows[split] = [0] * len(self.layers)
        index = self._layer_index[name]
        acc = reference.accumulation_dtype(sparsity.dtype)  # no float16 sums: they overflow
        if sparsity.dtype == acc:
            self._sums[split][index] += (sparsity.sum(), entropy.sum())
        else:
            self._sums[split][index] += (sparsity.sum(dtype=acc), entropy.sum(dtype=acc))
        self._rows[split][index] += sparsity.numel()

    def batch_sparsity(self) -> torch.Tensor:
        """Mean over layers of each layer's mean sparsity in the latest forward pass.

        Graph-connected (differentiable) when :attr:`differentiable` is set and the pass
        ran with grad; a zero scalar when no monitored layer produced a recordable output.
        A module called several times in one pass contributes the mean of its calls.
        """
        if not self._graph_means:
            return torch.zeros(())
        per_layer = [torch.stack(values).mean() for values in self._graph_means.values()]
        return torch.stack(per_layer).mean()

    def end_epoch(self, epoch: int) -> list[SparsityRecord]:
        """Close the epoch: one record per (split, layer) seen, appended to :attr:`history`.

        Reduces the sums and row counts over all ranks first (one collective), then syncs
        with the host once. Layers with no recorded rows in a split get no record.
        """
        splits = distributed.union_of_names(list(self._sums))
        partials = [t for per_layer in self._sums.values() for sums in per_layer for t in sums]
        device = partials[0].device if partials else distributed.collective_device()
        dtype = torch.float32 if device.type == "mps" else torch.float64
        table = torch.zeros(len(splits), len(self.layers), 3, dtype=dtype, device=device)
        for i, split in enumerate(splits):
            for j, sums in enumerate(self._sums.get(split, ())):
                if sums:  # [sparsity, entropy, sparsity, entropy, ...] of every batch
                    table[i, j, :2] = torch.stack(sums).to(dtype).view(-1, 2).sum(0)
            if split in self._rows:
                table[i, :, 2] = torch.tensor(self._rows[split], dtype=dtype)
        table = distributed.all_reduce_sum(table).cpu()
        self.reset()
        records = []
        for i, split in enumerate(splits):
            for j, layer in enumerate(self.layers):
                rows = int(table[i, j, 2])
                if rows:
                    records.append(
                        SparsityRecord(
                            epoch,
                            split,
                            layer,
                            float(table[i, j, 0] / rows),
                            float(table[i, j, 1] / rows),
                            rows,
                        )
                    )
        self.history.extend(records)
        return records

    def reset(self) -> None:
        """Discard what was accumulated since the last :meth:`end_epoch`."""
        self._sums.clear()
        self._rows.clear()

    @contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """Collect per-row sparsity maps instead of accumulating, for one forward pass.

        Yields a dict filled during the block with ``{layer: (N, C) float32 CPU tensor}``
        (the last call wins for a module called twice); nothing enters the epoch's means.
        """
        maps: dict[str, torch.Tensor] = {}
        self._capture = maps
        try:
            yield maps
        finally:
            self._capture = None


class SparsityPenalty:
    """``weight * mean over monitored layers of the layer's mean sparsity``, differentiable.

    Call it after the forward pass and add it to the loss::

        penalty = SparsityPenalty(model, weight=0.1)   # or SparsityPenalty(monitor, 0.1)
        loss = criterion(model(x), y) + penalty()

    It switches its monitor to measure with autograd, so the value comes from the fused
    op's backward, and the monitor's epoch statistics reuse the same (detached) values.
    Returns a zero scalar when the latest pass recorded nothing with grad (e.g. eval).
    """

    def __init__(self, monitor: SparsityMonitor | nn.Module, weight: float):
        weight = float(weight)
        if not weight >= 0.0:
            raise ValueError(f"the penalty weight must be a number >= 0, got {weight}")
        self.monitor = monitor if isinstance(monitor, SparsityMonitor) else SparsityMonitor(monitor)
        self.monitor.differentiable = True
        self.weight = weight

    def __call__(self) -> torch.Tensor:
        return self.weight * self.monitor.batch_sparsity()
