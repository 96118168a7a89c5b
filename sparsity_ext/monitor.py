"""Layer-wise sparsity monitor and the differentiable sparsity penalty.

:class:`SparsityMonitor` puts forward hooks on chosen modules of a model. Every hooked
output, seen as ``(N, C, *S)`` with ``L = prod(S)`` positions (see *Axes* below), goes to
one op call, :func:`sparsity_ext.ops.monitor_sums_`, which adds every column's sum over
the output's rows into one persistent float64 buffer per (split, layer call) on the
activation's device (float32 on MPS): no autograd, no Python lists growing per batch, no
host sync per batch. On the CPU the op is one native call; elsewhere (CUDA) it is the two
fused forward kernels and a few reductions in PyTorch. At :meth:`SparsityMonitor.end_epoch` the buffers become one :class:`SparsityRecord`
per (epoch, split, layer call): means over every sample and channel seen in that epoch.
Under ``torch.distributed`` the sums are all-reduced before dividing, so the means are
exact over all ranks' samples.

Columns of a record (one pass over x per measure; on AVX-512 CPUs one pass for both where
rows are short, L <= 64, and x is float32 or 16-bit):

- ``sparsity``, ``entropy``: the paper's softmax measure, mean over all rows.
- ``sparsity_l1``, ``entropy_l1``: the scale-invariant L1 measure (``p = a / sum a`` with
  ``a = max(x, 0)``), mean over *live* rows only (rows with a positive value).
- ``zero_fraction``: share of activation values ``<= 0``.
- ``dead_fraction``: share of rows with no positive value.
- ``mean_activation``: mean of the activation values.
- ``rows``: the number of (sample, channel) rows.

Per-row values are float32 (float64 for float64 activations), also for float16/bfloat16
activations; on the CPU at most 16 rows are summed in that dtype before float64.

Axes. A hooked output is measured as ``(N, C, *S)`` with the channel dim chosen by this
rule (``channel_dim`` overrides it, per monitor or per layer):

1. fewer than 3 dims, not floating point, not a tensor (e.g. a tuple), or one position
   (``L == 1``: squeeze-excitation, global pooling): skipped, no rows;
2. the output of a convolution module: channels at dim 1;
3. a module whose parent module also holds an ``nn.Linear`` with ``out_features`` equal to
   the output's last dim (and no convolution with ``out_channels`` equal to dim 1):
   channels last (ConvNeXt's ``(N, H, W, 4C)`` GELU, a transformer MLP's ``(N, T, D)``:
   rows are (sample, feature), positions are the pixels or tokens);
4. otherwise 4-D and larger outputs are channels first (``(N, C, H, W)``), and 3-D outputs
   are ambiguous (``(N, C, L)`` or ``(N, T, D)``): skipped with one warning that names the
   layer and the ``channel_dim`` to pass.

Calls. A module called ``k`` times in one forward pass of the model gives ``k`` records:
its ``j``-th call (from 0) is named ``f"{name}#{j}"``; a module only ever seen called once
per pass keeps its plain ``name``. Calls are counted from the start and from the end of
each forward pass of the model, so a submodule called alone between passes starts at 0.

Hooks that fire while autograd runs a backward pass (the recomputation of
``torch.utils.checkpoint``) are ignored: those rows were counted in the forward pass.

:class:`SparsityPenalty` reuses the same hooks: with a penalty attached, a hooked output
that requires grad is measured *with* autograd, and the penalty keeps the graph-connected
per-call means of the latest forward pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple, Optional, Union

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
ChannelDim = Union[None, int, Mapping[str, Optional[int]]]
NORMALIZATIONS = ("softmax", "l1")


class SparsityRecord(NamedTuple):
    """One epoch's means over every (sample, channel) row one layer call produced in one
    split (see the module doc for each column)."""

    epoch: int
    split: str
    layer: str
    sparsity: float
    entropy: float
    sparsity_l1: float
    entropy_l1: float
    zero_fraction: float
    dead_fraction: float
    mean_activation: float
    rows: int


# Columns of the per-(split, layer call) sums (ops.MONITOR_COLUMNS).
(_SPARSITY, _ENTROPY, _SPARSITY_L1, _ENTROPY_L1, _LIVE, _ZEROS, _SUM, _ROWS, _VALUES) = (
    ops.MONITOR_COLUMNS.index(name) for name in (
        "sparsity", "entropy", "sparsity_l1", "entropy_l1", "live_rows", "non_positive",
        "total", "rows", "values"))  # fmt: skip


def default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The feature-extraction layers of ``model``, by qualified name, in forward order.

    Rule: every activation module (:data:`ACTIVATION_TYPES`) of the model; if the model
    has none (its activations are functional calls), every convolution module
    (:data:`CONV_TYPES`) instead. Outputs with no positions to measure (fully connected
    ``(N, F)``, squeeze-excitation ``(N, C, 1, 1)``) are hooked but never recorded.
    """
    for kinds in (ACTIVATION_TYPES, CONV_TYPES):
        found = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
        if found:
            return found
    return {}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / FSDP-style ``.module`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


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


class _AxesRule(NamedTuple):
    """What the default axes rule knows about one hooked module (see the module doc)."""

    is_conv: bool
    conv_channels: frozenset  # out_channels of convolutions beside it
    linear_features: frozenset  # out_features of nn.Linear beside it


def _axes_rule(model: nn.Module, name: str, module: nn.Module) -> _AxesRule:
    parent_name = name.rpartition(".")[0]
    parent = dict(model.named_modules()).get(parent_name) if name else None
    siblings = list(parent.children()) if parent is not None else []
    return _AxesRule(
        isinstance(module, CONV_TYPES),
        frozenset(m.out_channels for m in siblings if isinstance(m, CONV_TYPES)),
        frozenset(m.out_features for m in siblings if isinstance(m, nn.Linear)),
    )


class _LayerHook:
    """The forward hook of one monitored module: a picklable object, not a closure."""

    def __init__(self, monitor: SparsityMonitor, name: str):
        self.monitor = monitor
        self.name = name

    def __call__(self, module, inputs, output) -> None:
        self.monitor._observe(self.name, output)


class SparsityMonitor:
    """Per-layer sparsity columns of a model's activations, per epoch and split.

    Args:
        model: the network; ``DistributedDataParallel`` and ``torch.compile`` wrappers are
            unwrapped (the hooks go on the user's module, and the compiled graph traces them).
        layers: ``None`` for :func:`default_layers`, or module names / submodules, or a
            ``{name: module}`` mapping.
        channel_dim: ``None`` for the default axes rule (module doc), an int for every
            layer (``1`` channels first, ``-1`` channels last), or ``{layer: int | None}``.

    The split of a batch is :attr:`split` if set, else ``"train"`` while the model is in
    training mode and ``"test"`` in eval mode. Use it in any loop::

        with SparsityMonitor(model) as monitor:
            for epoch in range(epochs):
                model.train(); ...   # batches recorded as "train"
                model.eval(); ...    # batches recorded as "test"
                records = monitor.end_epoch(epoch)

    All ranks of a process group must call :meth:`end_epoch` together (it all-reduces).
    A ``copy.deepcopy`` of the model (a teacher, an EMA copy) gets its own monitor copy:
    its forwards never touch this monitor. Monitor and model pickle (``torch.save``).
    """

    def __init__(self, model: nn.Module, layers: LayerSpec = None, channel_dim: ChannelDim = None):
        model = unwrap_model(model)
        self.model = model
        self.explicit_layers = layers is not None
        self.layers = _resolve_layers(model, layers)
        if isinstance(channel_dim, Mapping):
            unknown = set(channel_dim) - set(self.layers)
            if unknown:
                raise ValueError(
                    f"channel_dim names layers that are not monitored: {sorted(unknown)}"
                )
            self.channel_dims = {name: channel_dim.get(name) for name in self.layers}
        else:
            self.channel_dims = {name: channel_dim for name in self.layers}
        for name, dim in self.channel_dims.items():
            if dim is not None and (not isinstance(dim, int) or dim == 0):
                raise ValueError(
                    f"channel_dim for {name!r} must be None or a non-batch dim (an int other "
                    f"than 0, e.g. 1 or -1), got {dim!r}"
                )
        self._rules = {name: _axes_rule(model, name, m) for name, m in self.layers.items()}
        self.split: str | None = None
        self.enabled = True
        self.history: list[SparsityRecord] = []
        # Set by SparsityPenalty: the measure to keep graph-connected ("softmax" or "l1").
        self.graph_measure: str | None = None
        self._layer_index = {name: i for i, name in enumerate(self.layers)}
        # (split, layer, call) -> float64 column sums on the activation's device
        self._buffers: dict[tuple[str, str, int], torch.Tensor] = {}
        self._multi_call: set[str] = set()  # layers ever seen called twice in one pass
        self._calls: dict[str, int] = {}  # calls per layer in the current forward pass
        self._graph_means: dict[tuple[str, int], torch.Tensor] = {}  # latest pass, with grad
        self._capture: dict[tuple[str, int], torch.Tensor] | None = None
        self._skipped: dict[str, str] = {}  # layer -> why its latest output was skipped
        self._axes: dict[tuple[str, torch.Size], int | str] = {}  # see _channels_first
        self._warned: set[str] = set()
        self._handles = [
            module.register_forward_hook(_LayerHook(self, name))
            for name, module in self.layers.items()
        ]
        # A new forward pass: restart the call counts and the penalty's graph values.
        self._handles.append(model.register_forward_pre_hook(self._start_forward))
        self._handles.append(model.register_forward_hook(self._end_forward))

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> SparsityMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __getstate__(self) -> dict:
        # The latest pass's graph-connected values are transient and cannot be copied.
        state = self.__dict__.copy()
        state["_graph_means"] = {}
        state["_capture"] = None
        return state

    def remove(self) -> None:
        """Detach every hook; the model is left exactly as before. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._graph_means.clear()

    def start_pass(self) -> None:
        """Start a new pass: restart the call counts and drop the penalty's graph values.
        The model's forward pre-hook does this; call it yourself when a step runs the
        hooked submodules without calling the model (e.g. a LightningModule's step)."""
        self._calls.clear()
        self._graph_means.clear()

    def _start_forward(self, module, inputs) -> None:
        self.start_pass()

    def _end_forward(self, module, inputs, output) -> None:
        self._calls.clear()

    # -- per batch --------------------------------------------------------------------
    def _skip(self, name: str, why: str) -> None:
        self._skipped[name] = why

    def _channels_first(self, name: str, output: torch.Tensor) -> torch.Tensor | None:
        """``output`` as an ``(N, C, *S)`` view by the axes rule, or None to skip it.

        The rule depends on the layer and the output's shape only, so its answer is kept per
        (layer, shape): a hook then costs one dict lookup here (eager; a compiled graph
        applies the rule while tracing)."""
        if torch.compiler.is_compiling():
            axes = self._axes_of(name, output.shape)
        else:
            key = (name, output.shape)
            axes = self._axes.get(key)
            if axes is None:
                if len(self._axes) >= 4096:  # a bound for models fed ever new shapes
                    self._axes.clear()
                axes = self._axes[key] = self._axes_of(name, output.shape)
        if isinstance(axes, str):
            self._skip(name, axes)
            return None
        return output if axes == 1 else output.movedim(axes, 1)

    def _axes_of(self, name: str, shape: torch.Size) -> int | str:
        """The channel dim of outputs of ``shape`` from layer ``name`` (1, or another dim to
        move to 1), or why they are skipped."""
        ndim = len(shape)
        if ndim < 3:
            return f"{ndim}-D output {tuple(shape)} has no positions"
        dim = self.channel_dims[name]
        if dim is None:
            rule = self._rules[name]
            if rule.is_conv:
                dim = 1
            elif shape[-1] in rule.linear_features and shape[1] not in rule.conv_channels:
                dim = -1
            elif ndim >= 4:
                dim = 1
            else:
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(
                        f"SparsityMonitor: layer {name!r} gives a 3-D output "
                        f"{tuple(shape)}, either (N, C, L) or tokens (N, T, D); it is "
                        f"skipped. Pass channel_dim={{{name!r}: 1}} for channels first or "
                        f"channel_dim={{{name!r}: -1}} for (N, T, D) tokens.",
                        stacklevel=5,
                    )
                return f"3-D output {tuple(shape)} is ambiguous"
        dim = dim % ndim
        positions, values = 1, 1  # plain products: torch.compile traces them
        for d in range(ndim):
            values = values * shape[d]
            if d not in (0, dim):
                positions = positions * shape[d]
        if positions == 1:
            return f"output {tuple(shape)} has one position per row"
        if values == 0:
            return f"output {tuple(shape)} is empty"
        return dim

    def _observe(self, name: str, output) -> None:
        if not self.enabled:
            return
        if not torch.compiler.is_compiling() and _in_backward():
            return  # checkpoint recomputation: counted in the forward pass already
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        if call:
            self._multi_call.add(name)
        if not isinstance(output, torch.Tensor):
            self._skip(name, f"output is a {type(output).__name__}, not a tensor")
            return
        if not output.is_floating_point():
            self._skip(name, f"output dtype {output.dtype} is not floating point")
            return
        x = self._channels_first(name, output)
        if x is None:
            return
        measure = self.graph_measure
        if measure is not None and torch.is_grad_enabled() and x.requires_grad:
            sparsity = ops.channel_stats(x, normalize=measure).sparsity
            acc = reference.accumulation_dtype(sparsity.dtype)
            self._graph_means[(name, call)] = sparsity.mean(dtype=acc)
        if self._capture is not None:
            self._capture[(name, call)] = ops.monitor_columns(x)[_SPARSITY].float().cpu()
            return
        key = (self._split_name(), name, call)
        sums = self._buffers.get(key)
        if sums is None:
            # float64 sums; float32 on MPS, which has no float64
            dtype = torch.float32 if x.device.type == "mps" else torch.float64
            sums = torch.zeros(len(ops.MONITOR_COLUMNS), dtype=dtype, device=x.device)
            self._buffers[key] = sums
        if sums.dtype == torch.float64:
            ops.monitor_sums_(sums, x)  # one op call: every column, no autograd, no host sync
        else:
            sums.add_(ops.monitor_columns(x).sum((1, 2)))

    def _split_name(self) -> str:
        return self.split or ("train" if self.model.training else "test")

    # -- per epoch --------------------------------------------------------------------
    def record_name(self, name: str, call: int) -> str:
        """``name`` for a module seen called once per pass, else ``f"{name}#{call}"``."""
        return f"{name}#{call}" if name in self._multi_call else name

    def batch_sparsity(self) -> torch.Tensor:
        """Mean over layer calls of each call's mean sparsity in the latest forward pass.

        Graph-connected when a penalty is attached and the pass ran with grad. Only calls
        that gave rows count (:attr:`batch_layers` names them); a zero scalar if none did.
        """
        if not self._graph_means:
            return torch.zeros(())
        return torch.stack(list(self._graph_means.values())).mean()

    @property
    def batch_layers(self) -> list[str]:
        """The layer calls :meth:`batch_sparsity` averages over, from the latest pass."""
        return [self.record_name(name, call) for name, call in self._graph_means]

    def end_epoch(self, epoch: int) -> list[SparsityRecord]:
        """Close the epoch: one record per (split, layer call) seen, appended to :attr:`history`.

        Reduces the sums over all ranks first (one collective), then syncs with the host
        once. Warns about explicitly requested layers that gave no rows in this epoch.
        """
        keys = [f"{s}\t{n}\t{c}" for s, n, c in self._buffers]
        keys += [f"\t{n}\t1" for n in self._multi_call]  # spread the naming over ranks
        union = [key.split("\t") for key in distributed.union_of_names(keys)]
        self._multi_call.update(n for s, n, c in union if int(c) > 0)
        slots = sorted(
            {(s, n, int(c)) for s, n, c in union if s},
            key=lambda k: (k[0], self._layer_index[k[1]], k[2]),
        )
        buffers = list(self._buffers.values())
        device = buffers[0].device if buffers else distributed.collective_device()
        dtype = buffers[0].dtype if buffers else torch.float64
        table = torch.zeros(len(slots), len(ops.MONITOR_COLUMNS), dtype=dtype, device=device)
        for i, key in enumerate(slots):
            if key in self._buffers:
                table[i] = self._buffers[key].to(device, dtype)
        table = distributed.all_reduce_sum(table).cpu().double()
        self.reset()
        records = []
        for (split, name, call), sums in zip(slots, table.tolist()):
            rows, values, live = sums[_ROWS], sums[_VALUES], sums[_LIVE]
            if not rows:
                continue
            records.append(SparsityRecord(
                epoch, split, self.record_name(name, call),
                sparsity=sums[_SPARSITY] / rows,
                entropy=sums[_ENTROPY] / rows,
                sparsity_l1=sums[_SPARSITY_L1] / live if live else math.nan,
                entropy_l1=sums[_ENTROPY_L1] / live if live else math.nan,
                zero_fraction=sums[_ZEROS] / values,
                dead_fraction=(rows - live) / rows,
                mean_activation=sums[_SUM] / values,
                rows=int(rows),
            ))  # fmt: skip
        self._warn_silent_layers({r.layer.partition("#")[0] for r in records})
        self.history.extend(records)
        return records

    def _warn_silent_layers(self, recorded: set[str]) -> None:
        if not self.explicit_layers:
            return
        silent = [n for n in self.layers if n not in recorded and n not in self._warned]
        if silent:
            self._warned.update(silent)
            why = "; ".join(f"{n}: {self._skipped.get(n, 'never called')}" for n in silent)
            warnings.warn(f"SparsityMonitor: requested layers gave no rows this epoch ({why})",
                          stacklevel=3)  # fmt: skip

    def reset(self) -> None:
        """Discard what was accumulated since the last :meth:`end_epoch`."""
        self._buffers.clear()

    @contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """Collect per-row sparsity maps instead of accumulating, for the block's passes.

        Yields a dict filled when the block ends with ``{layer call: (N, C) float32 CPU
        tensor}`` named as the records are (every call of a module called several times;
        the last pass wins); nothing enters the epoch's means.
        """
        maps: dict[str, torch.Tensor] = {}
        self._capture = captured = {}
        try:
            yield maps
        finally:
            self._capture = None
            maps.update({self.record_name(n, c): m for (n, c), m in captured.items()})


_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (-1 outside one).

    The autograd engine's own flag, so it holds for reentrant and non-reentrant
    checkpointing alike; torch has no public spelling of it (2.11-2.14)."""
    return _current_graph_task_id() != -1


class SparsityPenalty:
    """``weight * mean over monitored layer calls of the call's mean sparsity``, differentiable.

    Call it after the forward pass and add it to the loss::

        penalty = SparsityPenalty(model, weight=0.1)   # or SparsityPenalty(monitor, 0.1)
        loss = criterion(model(x), y) + penalty()

    ``normalize`` picks the measure: ``"softmax"`` (the paper's, through the fused op's
    backward) or ``"l1"`` (the scale-invariant one). Only layer calls that gave rows in the
    latest pass count; :attr:`layers` names them. Returns a zero scalar when the latest
    pass recorded nothing with grad (e.g. eval).
    """

    def __init__(self, monitor: SparsityMonitor | nn.Module, weight: float,
                 normalize: str = "softmax"):  # fmt: skip
        weight = float(weight)
        if not weight >= 0.0:
            raise ValueError(f"the penalty weight must be a number >= 0, got {weight}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.monitor = monitor if isinstance(monitor, SparsityMonitor) else SparsityMonitor(monitor)
        self.monitor.graph_measure = normalize
        self.normalize = normalize
        self.weight = weight

    @property
    def layers(self) -> list[str]:
        """The layer calls the latest value averaged over."""
        return self.monitor.batch_layers

    def __call__(self) -> torch.Tensor:
        return self.weight * self.monitor.batch_sparsity()
