"""The operators: schemas, fake, fallback, autograd and vmap registrations, public functions.

Each measure is served by one pair of native ops in the ``sparsity_ext`` namespace, defined
here (the C++ library only registers CPU and CUDA kernels for them): ``channel_stats`` (the
softmax measure) and ``l1_stats`` (the L1 measure, whose ``row_stats`` is ``(4, N, C)``:
S, T/S, count of x <= 0, sum of x; see reference.py). For ``channel_stats``:

- ``channel_stats_forward(x) -> (entropy, perplexity, sparsity, row_stats)``
- ``channel_stats_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity) -> grad_x``
- ``channel_stats_backward.out(..., *, grad_x) -> ()``: the same, written into ``grad_x``

A third op serves the monitor: ``monitor_sums_(sums, x) -> ()`` adds the sums over x's
rows of every monitor column (:data:`MONITOR_COLUMNS`, both measures) into a float64
buffer, in one native call with no autograd (see :func:`monitor_sums_`).

``row_stats`` ``(3, N, C)`` holds each row's max, log-sum and mean shift in the accumulation
dtype: all the one-pass backward needs, so no softmax is ever stored. It is not
differentiable. Everything else is, to any order and under every ``torch.func`` transform:

- reverse mode: ``grad_x = k * J`` with ``J = dH/dx`` and one coefficient per row
  ``k = g_H + PP (g_PP + slope g_SP)``, ``slope = dSP/dPP`` (the fused backward kernel);
- double backward, given ``v`` = the gradient reaching ``grad_x`` (``a = <v, J>`` per row,
  ``dPP/dx = PP J``)::

      d/dg_H = a,   d/dg_PP = PP a,   d/dg_SP = PP slope a
      d/dx   = a PP (g_PP + slope g_SP) J + k (d2H/dx2) v

- forward mode: ``dH = <J, t>``, ``dPP = PP dH``, ``dSP = slope dPP`` for a tangent ``t``,
  ``J`` from the fused backward kernel; the backward's own tangent is
  ``dk J + k (d2H/dx2) t`` with ``dk = t_gH + dPP (g_PP + slope g_SP) + PP (t_gPP + slope t_gSP)``;
- vmap: the vmapped dims are folded into N.

``J``, ``H`` and ``(d2H/dx2) v`` beyond the fused kernels come from the measure's plain
PyTorch code (:func:`sparsity_ext.reference.entropy_derivatives`), computed from ``x`` alone
so that they differentiate again.
"""


import dataclasses
import functools
from typing import Callable

import torch

from . import _extension, reference
from .reference import NORMALIZATIONS, ChannelStats

__all__ = ["ChannelStats", "ChannelStatsFunction", "L1StatsFunction", "NORMALIZATIONS",
           "channel_stats", "entropy", "perplexity", "sparsity"]

NAMESPACE = "sparsity_ext"


@dataclasses.dataclass(frozen=True)
class Measure:
    """What differs between measures; everything else below is written once for all.

    ``reference_forward(x)`` and ``reference_row_stats(x)`` are the fallback forward kernel
    (outputs and the ``(row_stats_rows, N, C)`` statistics); ``entropy_derivatives(x, v)``
    gives H, dH/dx and (d2H/dx2) v in plain PyTorch (see reference.entropy_derivatives).
    """

    name: str
    row_stats_rows: int
    reference_forward: Callable
    reference_row_stats: Callable
    entropy_derivatives: Callable

    # Looked up once (after the schemas below are defined): every call of a measure goes
    # through these, so no attribute chain of torch.ops per call.
    @functools.cached_property
    def forward_op(self):
        return getattr(torch.ops.sparsity_ext, f"{self.name}_forward").default

    @functools.cached_property
    def backward_op(self):
        return getattr(torch.ops.sparsity_ext, f"{self.name}_backward").default

    @functools.cached_property
    def backward_out_op(self):
        return getattr(torch.ops.sparsity_ext, f"{self.name}_backward").out


CHANNEL_STATS = Measure("channel_stats", 3, reference.channel_stats, reference.row_stats,
                        reference.entropy_derivatives)
# The scale-invariant L1 measure; row_stats (4, N, C): S, T/S, count of x <= 0, sum of x
# (the last two serve the monitor from the same read of x).
L1_STATS = Measure("l1_stats", 4, functools.partial(reference.channel_stats, normalize="l1"),
                   reference.l1_row_stats, reference.l1_entropy_derivatives)


# --- shared pieces --------------------------------------------------------------------


def _grad_x_like(x: torch.Tensor) -> torch.Tensor:
    """An empty grad_x for x: dense, channels innermost when x's channels are its unit-stride
    dim (a channels_last-like x is then read in place), else contiguous.

    The rule of the fake and fallback kernels; the CPU kernel of the functional backward
    allocates by the same rule in C++ (empty_grad_x, csrc/host_prepare.h; test_ops checks
    they agree). The kernels read x in whatever layout grad_x has.
    """
    spatial = range(2, x.dim())
    if x.shape[1] > 1 and x.stride(1) == 1 and any(
            x.shape[d] > 1 and x.stride(d) != 1 for d in spatial):
        perm = [0, *spatial, 1]
        inverse = [0, x.dim() - 1, *range(1, x.dim() - 1)]
        return x.new_empty([x.shape[d] for d in perm]).permute(inverse)
    return x.new_empty(x.shape)


def check_backward_arguments(x, row_stats, grads, grad_x=None, row_stats_rows=3) -> None:
    """The native backward's checks, with the same types and texts (csrc/host_prepare.cpp)."""
    reference.check_input(x)
    n, c = x.shape[0], x.shape[1]
    acc = reference.accumulation_dtype(x.dtype)
    arguments = [("row_stats", row_stats, acc, (row_stats_rows, n, c))]
    arguments += [(name, g, x.dtype, (n, c)) for name, g in
                  zip(("grad_entropy", "grad_perplexity", "grad_sparsity"), grads)]
    if grad_x is not None:
        arguments.append(("grad_x", grad_x, x.dtype, tuple(x.shape)))
    for name, t, dtype, shape in arguments:
        reference.check_dense(t, name)
        if t.device != x.device:
            raise RuntimeError(f"sparsity_ext: all tensors must be on the same device, but x is "
                               f"on {x.device} and {name} is on {t.device}")
        if t.dtype != dtype:
            raise TypeError(f"sparsity_ext: {name} must have dtype {dtype}, got {t.dtype}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"sparsity_ext: {name} must have shape {reference._shape(shape)}, "
                             f"got {reference._shape(t.shape)}")


def _coefficient(perplexity, grads, length):
    """k = g_H + PP (g_PP + slope g_SP), per row."""
    grad_entropy, grad_perplexity, grad_sparsity = grads
    return grad_entropy + perplexity * (grad_perplexity
                                        + reference.sparsity_slope(length) * grad_sparsity)


class _SecondOrderTerms:
    """Per-row pieces of the backward op's derivatives, in the accumulation dtype, computed
    from x alone (so differentiable again): J = dH/dx (N, C, L), PP, k, dk/dPP, the slope
    dSP/dPP, and (d2H/dx2) direction."""

    def __init__(self, measure, x, grads, direction):
        derivatives = measure.entropy_derivatives(x, direction)
        self.gradient, self.hvp = derivatives.gradient, derivatives.hvp
        self.dtype = self.gradient.dtype
        self.perplexity = derivatives.entropy.exp()
        self.length = reference.positions(x)
        self.slope = reference.sparsity_slope(self.length)
        grads = [g.to(self.dtype) for g in grads]
        self.k = _coefficient(self.perplexity, grads, self.length)
        self.dk_dpp = grads[1] + self.slope * grads[2]


# Where N sits in each argument and output of the ops: x, grad_x and the (N, C) results at 0,
# row_stats (rows, N, C) at 1.
FORWARD_N_DIMS = ((0,), (0, 0, 0, 1))
BACKWARD_N_DIMS = ((0, 1, 0, 0, 0), (0,))


def _vmap_rule(call, n_dims):
    """A vmap rule for an op (or its autograd.Function): fold the vmapped dim into N.

    Each argument's vmapped dim moves next to its N (an unbatched argument is expanded), the
    two merge into one, ``call`` runs once, and each output's N splits back into (B, N).
    """
    in_n_dims, out_n_dims = n_dims

    def rule(info, in_dims, *args):
        size = info.batch_size
        folded = []
        for t, b, n_dim in zip(args, in_dims, in_n_dims):
            t = t.movedim(b, 0) if b is not None else t.unsqueeze(0).expand(size, *t.shape)
            folded.append(t.movedim(0, n_dim).flatten(n_dim, n_dim + 1))
        outputs = call(*folded)
        if len(out_n_dims) == 1:
            return outputs.unflatten(0, (size, -1)), 0
        return (tuple(o.unflatten(n_dim, (size, -1)) for o, n_dim in zip(outputs, out_n_dims)),
                out_n_dims)

    return rule


def _needs_autograd(tensors) -> bool:
    """Whether a call must go through an autograd.Function: something requires grad, or
    carries a forward-mode tangent (which the kernels below autograd would drop)."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors):
        return True
    if torch.autograd.forward_ad._current_level < 0:
        return False
    return any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _differentiable(function, op, *args):
    """``function.apply(*args)`` (its old-style twin ``function.plain`` outside torch.func
    transforms) when anything may differentiate it, else the bare op.

    From Python, not from inside a dispatcher kernel: torch.func transforms can only take
    an autograd.Function there. Under torch.compile (and torch.jit.trace) the graph holds
    the bare op, differentiated through the op's autograd kernel.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return op(*args)
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    if _needs_autograd(args):
        return function.plain.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():  # skips the Python autograd kernels
        return op(*args)


# --- autograd.Functions: one per op of a measure ----------------------------------------


def _with_plain_twin(function):
    """Give ``function`` (new style: forward without ctx, then setup_context) a twin
    ``function.plain`` in the old style, whose forward takes ctx and runs setup_context
    itself: the same forward, backward and jvp, with less work per apply (no binding of the
    arguments to forward's signature, one Python call less), which is a measurable part of
    a small input's forward+backward. torch.func transforms take only the new style, so
    calls use the twin only while none is active (_differentiable)."""
    def forward(ctx, *args):
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    # Made with type() so that its grad_fn is named after function, as the original's is.
    function.plain = type(function.__name__, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(function.backward),
        "jvp": staticmethod(function.jvp), "__qualname__": function.__qualname__})
    return function


def _forward_function(measure: Measure, backward_function):
    class Forward(torch.autograd.Function):
        """Differentiable forward op: (entropy, perplexity, sparsity, row_stats)."""

        @staticmethod
        def forward(x):
            with torch._C._AutoDispatchBelowAutograd():
                return measure.forward_op(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            (x,) = inputs
            _, perplexity, _, row_stats = output
            ctx.mark_non_differentiable(row_stats)
            # No zero-filled (rows, N, C) gradient for row_stats on every backward: an
            # unused output's grad arrives as None (filled in backward where needed).
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(x, row_stats, perplexity)
            ctx.save_for_forward(x, row_stats, perplexity)

        @staticmethod
        def backward(ctx, grad_entropy, grad_perplexity, grad_sparsity, _grad_row_stats):
            grads = (grad_entropy, grad_perplexity, grad_sparsity)
            if not ctx.needs_input_grad[0] or all(g is None for g in grads):
                return None
            x, row_stats, perplexity = ctx.saved_tensors
            grads = [torch.zeros_like(perplexity) if g is None else g for g in grads]
            return _differentiable(backward_function, measure.backward_op, x, row_stats, *grads)

        @staticmethod
        def jvp(ctx, tangent):
            x, row_stats, perplexity = ctx.saved_tensors
            ones, zeros = torch.ones_like(perplexity), torch.zeros_like(perplexity)
            gradient = _differentiable(backward_function, measure.backward_op,  # J = dH/dx
                                       x, row_stats, ones, zeros, zeros)
            acc = reference.accumulation_dtype(x.dtype)
            d_entropy = (gradient.to(acc) * tangent.to(acc)).reshape(*x.shape[:2], -1).sum(-1)
            d_perplexity = perplexity.to(acc) * d_entropy
            slope = reference.sparsity_slope(reference.positions(x))
            return (d_entropy.to(x.dtype), d_perplexity.to(x.dtype),
                    (slope * d_perplexity).to(x.dtype), None)

    Forward.vmap = staticmethod(_vmap_rule(Forward.apply, FORWARD_N_DIMS))
    Forward.__name__ = Forward.__qualname__ = "".join(
        part.title() for part in measure.name.split("_")) + "Function"
    return _with_plain_twin(Forward)


def _backward_function(measure: Measure):
    class Backward(torch.autograd.Function):
        """Differentiable backward op: grad_x from x, row_stats and the three output grads."""

        @staticmethod
        def forward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity):
            with torch._C._AutoDispatchBelowAutograd():
                return measure.backward_op(x, row_stats, grad_entropy, grad_perplexity,
                                           grad_sparsity)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, row_stats, *grads = inputs
            ctx.save_for_backward(x, *grads)
            ctx.save_for_forward(x, *grads)

        @staticmethod
        def backward(ctx, v):
            x, *grads = ctx.saved_tensors
            terms = _SecondOrderTerms(measure, x, grads, v)
            a = (terms.gradient * v.reshape(terms.gradient.shape).to(terms.dtype)).sum(-1)
            grad_x = (a * terms.perplexity * terms.dk_dpp).unsqueeze(-1) * terms.gradient \
                + terms.k.unsqueeze(-1) * terms.hvp
            # row_stats gets none: grad_x depends on x through it, but H, J and the Hessian
            # are recomputed from x here, so that dependence is in grad_x already.
            return (grad_x.view(x.shape).to(x.dtype), None, a.to(x.dtype),
                    (terms.perplexity * a).to(x.dtype),
                    (terms.perplexity * terms.slope * a).to(x.dtype))

        @staticmethod
        def jvp(ctx, tangent_x, _tangent_row_stats, *tangent_grads):
            x, *grads = ctx.saved_tensors
            tangent_x = torch.zeros_like(x) if tangent_x is None else tangent_x
            tangent_grads = [torch.zeros_like(g) if t is None else t.to(g.dtype)
                             for g, t in zip(grads, tangent_grads)]
            terms = _SecondOrderTerms(measure, x, grads, tangent_x)
            d_perplexity = terms.perplexity * (
                terms.gradient * tangent_x.reshape(terms.gradient.shape).to(terms.dtype)).sum(-1)
            dk = (_coefficient(terms.perplexity, [t.to(terms.dtype) for t in tangent_grads],
                               terms.length) + d_perplexity * terms.dk_dpp)
            d_grad_x = dk.unsqueeze(-1) * terms.gradient + terms.k.unsqueeze(-1) * terms.hvp
            return d_grad_x.view(x.shape).to(x.dtype)

    Backward.vmap = staticmethod(_vmap_rule(Backward.apply, BACKWARD_N_DIMS))
    Backward.__name__ = Backward.__qualname__ = "".join(
        part.title() for part in measure.name.split("_")) + "BackwardFunction"
    return _with_plain_twin(Backward)


# --- registration: schemas, fake, fallback, autograd and vmap kernels, once per measure --

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def _register(measure: Measure, forward_function, backward_function) -> None:
    forward, backward = f"{measure.name}_forward", f"{measure.name}_backward"
    grads = "Tensor grad_entropy, Tensor grad_perplexity, Tensor grad_sparsity"
    _LIBRARY.define(f"{forward}(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)")
    _LIBRARY.define(f"{backward}(Tensor x, Tensor row_stats, {grads}) -> Tensor")
    _LIBRARY.define(f"{backward}.out(Tensor x, Tensor row_stats, {grads}, *, "
                    f"Tensor(a!) grad_x) -> ()")
    rows = measure.row_stats_rows

    # Fake kernels: shapes, dtypes and strides only, for torch.compile, export and opcheck.
    def forward_fake(x):
        reference.check_input(x)
        n, c = x.shape[0], x.shape[1]
        acc = reference.accumulation_dtype(x.dtype)
        return (x.new_empty((n, c)), x.new_empty((n, c)), x.new_empty((n, c)),
                x.new_empty((rows, n, c), dtype=acc))

    def backward_fake(x, row_stats, *grads):
        check_backward_arguments(x, row_stats, grads, row_stats_rows=rows)
        return _grad_x_like(x)

    def backward_out_fake(x, row_stats, *grads, grad_x):
        check_backward_arguments(x, row_stats, grads, grad_x, row_stats_rows=rows)

    torch.library.register_fake(f"{NAMESPACE}::{forward}", forward_fake, lib=_LIBRARY)
    torch.library.register_fake(f"{NAMESPACE}::{backward}", backward_fake, lib=_LIBRARY)
    torch.library.register_fake(f"{NAMESPACE}::{backward}.out", backward_out_fake, lib=_LIBRARY)

    # Where the C++ library has no kernel (not built, another device): the functional
    # backward allocates grad_x (the layout rule) and calls .out; the plain PyTorch
    # reference serves forward and .out. (The CPU library has its own functional backward.)
    def backward_functional(x, row_stats, *grads):
        reference.check_input(x)  # .out checks the rest
        grad_x = _grad_x_like(x)
        measure.backward_out_op(x, row_stats, *grads, grad_x=grad_x)
        return grad_x

    def forward_fallback(x):
        reference.check_input(x)
        return (*measure.reference_forward(x), measure.reference_row_stats(x))

    def backward_out_fallback(x, row_stats, *grads, grad_x):
        check_backward_arguments(x, row_stats, grads, grad_x, row_stats_rows=rows)
        derivatives = measure.entropy_derivatives(x)
        acc_grads = [g.to(derivatives.gradient.dtype) for g in grads]
        k = _coefficient(derivatives.entropy.exp(), acc_grads, reference.positions(x))
        grad_x.copy_((k.unsqueeze(-1) * derivatives.gradient).view(x.shape))

    _LIBRARY.impl(backward, backward_functional, "CompositeExplicitAutograd")
    _LIBRARY.impl(forward, forward_fallback, "CompositeExplicitAutograd")
    _LIBRARY.impl(f"{backward}.out", backward_out_fallback, "CompositeExplicitAutograd")

    # Autograd: through the Functions above, which also carry jvp, setup_context and vmap
    # (torch.library.register_autograd makes a Function with neither, so torch.func
    # transforms and forward mode would refuse it).
    def autograd_kernel(op, function):
        def kernel(keyset, *args):
            for name, t in zip(("x", "row_stats", "grad_entropy", "grad_perplexity",
                                "grad_sparsity"), args):
                reference.check_dense(t, name)  # before nested/sparse dispatch keys refuse
            if _needs_autograd(args):
                if torch._C._are_functorch_transforms_active():
                    raise RuntimeError(
                        f"sparsity_ext: torch.func transforms cannot differentiate "
                        f"torch.ops.sparsity_ext.{op._opname} called directly (it reaches "
                        f"autograd inside the dispatcher); call sparsity_ext.{measure.name} "
                        f"or {function.__name__}.apply, which support them all")
                return function.plain.apply(*args)
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
        return kernel

    def backward_out_autograd(keyset, *args, grad_x):
        if _needs_autograd([*args, grad_x]):
            raise RuntimeError(
                f"sparsity_ext: {backward}.out writes into grad_x and is not differentiable; "
                f"call torch.ops.sparsity_ext.{backward} (it allocates grad_x and supports "
                f"double backward and forward mode) instead")
        with torch._C._AutoDispatchBelowAutograd():
            measure.backward_out_op.redispatch(
                keyset & torch._C._after_autograd_keyset, *args, grad_x=grad_x)

    _LIBRARY.impl(forward, autograd_kernel(measure.forward_op, forward_function), "Autograd",
                  with_keyset=True)
    _LIBRARY.impl(backward, autograd_kernel(measure.backward_op, backward_function), "Autograd",
                  with_keyset=True)
    _LIBRARY.impl(f"{backward}.out", backward_out_autograd, "Autograd", with_keyset=True)

    # vmap of the ops called without autograd (with it, the Functions' own rule applies).
    torch.library.register_vmap(f"{NAMESPACE}::{forward}",
                                _vmap_rule(measure.forward_op, FORWARD_N_DIMS), lib=_LIBRARY)
    torch.library.register_vmap(f"{NAMESPACE}::{backward}",
                                _vmap_rule(measure.backward_op, BACKWARD_N_DIMS), lib=_LIBRARY)


# --- monitor_sums_: the monitor's column sums of one activation, one native call ---------

# Columns of monitor_sums_'s sums (csrc/monitor_sums_params.h has the same order): sums
# over the rows of each activation seen, of
MONITOR_COLUMNS = (
    "sparsity",      # softmax sparsity, every row
    "entropy",       # softmax entropy, every row
    "sparsity_l1",   # L1 sparsity (0 for a dead row)
    "entropy_l1",    # L1 entropy, live rows only
    "live_rows",     # rows with a positive value (S != 0; a NaN row counts)
    "non_positive",  # values <= 0
    "total",         # sum of the values
    "rows",          # rows
    "values",        # values (rows x positions)
)
_LIBRARY.define("monitor_sums_(Tensor(a!) sums, Tensor x) -> ()")


def _check_monitor_sums(sums: torch.Tensor, x: torch.Tensor) -> None:
    """The native op's checks, with the same types and texts (csrc/host_prepare.cpp)."""
    reference.check_input(x)
    reference.check_dense(sums, "sums")
    if sums.device != x.device:
        raise RuntimeError(f"sparsity_ext: all tensors must be on the same device, but x is on "
                           f"{x.device} and sums is on {sums.device}")
    if sums.requires_grad:
        raise RuntimeError("sparsity_ext: sums must not require grad (monitor_sums_ adds into "
                           "it and is not differentiable)")
    if sums.dtype != torch.float64:
        raise TypeError(f"sparsity_ext: sums must have dtype torch.float64, got {sums.dtype}")
    if tuple(sums.shape) != (len(MONITOR_COLUMNS),):
        raise ValueError(f"sparsity_ext: sums must have shape "
                         f"{reference._shape((len(MONITOR_COLUMNS),))}, got "
                         f"{reference._shape(sums.shape)}")


def monitor_columns(x: torch.Tensor) -> torch.Tensor:
    """``(len(MONITOR_COLUMNS), N, C)`` per-row values of the monitor's columns for x, in the
    accumulation dtype (the fused forwards' row statistics, not x-dtype outputs), without
    autograd: what :func:`monitor_sums_` sums over rows, in plain PyTorch."""
    with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
        softmax_stats = CHANNEL_STATS.forward_op(x)[3]
        s, mean_log, non_positive, total = L1_STATS.forward_op(x)[3]
    length = reference.positions(x)
    slope = reference.sparsity_slope(length)
    entropy = softmax_stats[1] - softmax_stats[2]
    live = s != 0
    entropy_l1 = torch.where(live, s.log() - mean_log, 0) * (1 if length > 1 else 0)
    sparsity_l1 = torch.where(live, (entropy_l1.exp() - length) * slope, 0)
    rows = torch.ones_like(s)
    return torch.stack([(entropy.exp() - length) * slope, entropy, sparsity_l1, entropy_l1,
                        live.to(s.dtype), non_positive, total, rows, rows * length])


def _monitor_sums_fallback(sums: torch.Tensor, x: torch.Tensor) -> None:
    _check_monitor_sums(sums, x)
    sums.add_(monitor_columns(x).sum((1, 2), dtype=torch.float64))


def _monitor_sums_fake(sums: torch.Tensor, x: torch.Tensor) -> None:
    _check_monitor_sums(sums, x)


_LIBRARY.impl("monitor_sums_", _monitor_sums_fallback, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::monitor_sums_", _monitor_sums_fake, lib=_LIBRARY)
# Not differentiable (it only adds into sums): autograd steps aside, so a monitored
# activation that requires grad costs no autograd work here.
_LIBRARY.impl("monitor_sums_", torch.library.fallthrough_kernel, "Autograd")


def monitor_sums_(sums: torch.Tensor, x: torch.Tensor) -> None:
    """Add the monitor's column sums of activation ``x`` ``(N, C, *S)`` into ``sums``, a
    float64 ``(len(MONITOR_COLUMNS),)`` tensor on x's device (columns: MONITOR_COLUMNS):
    one native call, one read of x per measure, no autograd, no host sync."""
    _MONITOR_SUMS_OP(sums, x)


_MONITOR_SUMS_OP = torch.ops.sparsity_ext.monitor_sums_.default


ChannelStatsBackwardFunction = _backward_function(CHANNEL_STATS)
ChannelStatsFunction = _forward_function(CHANNEL_STATS, ChannelStatsBackwardFunction)
_register(CHANNEL_STATS, ChannelStatsFunction, ChannelStatsBackwardFunction)
L1StatsBackwardFunction = _backward_function(L1_STATS)
L1StatsFunction = _forward_function(L1_STATS, L1StatsBackwardFunction)
_register(L1_STATS, L1StatsFunction, L1StatsBackwardFunction)

# normalize= of the public functions -> (measure, its differentiable forward Function).
MEASURES = {"softmax": (CHANNEL_STATS, ChannelStatsFunction), "l1": (L1_STATS, L1StatsFunction)}

# The CPU and CUDA kernels (built on first use, then cached); until and unless they load,
# the reference kernels registered above serve every call.
_extension.load()


# --- public functions -------------------------------------------------------------------


def measure_of(normalize: str) -> Measure:
    """The Measure serving ``normalize`` ("softmax" or "l1"); ValueError naming the choices
    otherwise."""
    if normalize not in MEASURES:
        raise ValueError(f"sparsity_ext: normalize must be one of {NORMALIZATIONS}, got "
                         f"{normalize!r}")
    return MEASURES[normalize][0]


@torch.jit.ignore  # TorchScript calls it through Python (see README: TorchScript)
def _channel_stats(x: torch.Tensor, normalize: str) -> ChannelStats:
    """:func:`channel_stats` without the default argument: TorchScript gives none to an
    ignored function, so the public functions are plain (scriptable) wrappers of this."""
    measure = measure_of(normalize)
    reference.check_input(x)
    entropy, perplexity, sparsity, _ = _differentiable(
        MEASURES[normalize][1], measure.forward_op, x)
    return ChannelStats(entropy, perplexity, sparsity)


def channel_stats(x: torch.Tensor, normalize: str = "softmax") -> ChannelStats:
    """Entropy, perplexity and sparsity of the spatial distribution of every (sample, channel).

    Args:
        x: ``(N, C, *S)`` with at least one spatial dim, float16/bfloat16/float32/float64,
            dense (strided) with any strides, any device.
        normalize: how a row ``x[n, c]`` (flattened to ``L = prod(S)`` positions) becomes a
            distribution ``p``:

            - ``"softmax"`` (the paper's measure): ``p = softmax(x[n, c])``. ``-inf`` masks
              a position; NaN or ``+inf`` in a row makes its outputs and gradient NaN.
            - ``"l1"`` (scale invariant): ``p = a / S`` with ``a = max(x, 0)``,
              ``S = sum a``, so ``H = log S - T / S`` with ``T = sum a log a``. A dead row
              (``S == 0``) gets ``H = log L, PP = L, SP = 0`` and zero gradient; the gradient
              is ``dH/dx_i = -(log a_i - T/S) / S`` where ``x_i > 0`` and exactly 0 where
              ``x_i <= 0`` (the ReLU convention); NaN or ``+inf`` in a row gives NaN.

    Returns:
        ``ChannelStats(entropy, perplexity, sparsity)``, each ``(N, C)`` in x's dtype and
        device, accumulated in float32 (float64 for float64): ``H = -sum p log p``,
        ``PP = exp(H)``, ``SP = (L - PP) / (L - 1)`` (0 when L == 1). Differentiable to any
        order, in forward and reverse mode, under every torch.func transform and
        torch.compile; one fused read of x forward and one elementwise pass backward.
    """
    return _channel_stats(x, normalize)


def entropy(x: torch.Tensor, normalize: str = "softmax") -> torch.Tensor:
    """Entropy (nats) of every row of ``x`` ``(N, C, *S)`` -> ``(N, C)`` (see channel_stats)."""
    return _channel_stats(x, normalize).entropy


def perplexity(x: torch.Tensor, normalize: str = "softmax") -> torch.Tensor:
    """Perplexity ``exp(entropy)``, in ``[1, L]``, of every row of ``x`` -> ``(N, C)``."""
    return _channel_stats(x, normalize).perplexity


def sparsity(x: torch.Tensor, normalize: str = "softmax") -> torch.Tensor:
    """Sparsity ``(L - perplexity) / (L - 1)``, in ``[0, 1]``, of every row -> ``(N, C)``."""
    return _channel_stats(x, normalize).sparsity
