"""Perplexity-based activation sparsity in plain PyTorch: the specification in code.

For ``x`` of shape ``(N, C, *S)`` every row ``x[n, c]`` is flattened to its
``L = prod(S)`` spatial positions and, relative to the row maximum ``m``::

    s  = sum_i exp(x_i - m)
    t  = sum_i (x_i - m) * exp(x_i - m)
    H  = log s - t / s                 # entropy of p = softmax(x[n, c]) in nats
    PP = exp(H)                        # perplexity, 1 <= PP <= L
    SP = (L - PP) / (L - 1)            # sparsity, 0 (uniform) .. 1 (one-hot); 0 if L == 1

Sums are taken relative to the row maximum so that rows far from zero keep their
precision; ``m`` is a constant of differentiation (the measure does not depend on it).
The gradient, with ``mu = sum_i p_i x_i``::

    dH/dx_i  = -p_i (x_i - mu),   dPP/dx_i = PP dH/dx_i,   dSP/dx_i = -dPP/dx_i / (L - 1)

Special rows, values and gradients (the fused kernels give the same):

- ``-inf`` at a position masks it: probability 0, no contribution, gradient exactly 0 there.
- NaN anywhere in a row, ``+inf`` anywhere in a row (as ``torch.softmax``), or a row of only
  ``-inf``: all three outputs are NaN for that row, and so is the gradient at *every*
  position of the row (its ``-inf`` positions included), whatever the incoming gradient.
  A NaN in means NaN out; a zero would hide it.
- ``L = 1`` (a finite single position): ``H = 0, PP = 1, SP = 0``, gradient 0.

Every compiled path is tested against these functions, and they are the fallback kernels
wherever the compiled extension is not available. Differentiable by autograd to any order.

With ``normalize="l1"`` the row is normalised by its L1 norm instead (the scale-invariant
companion of DESIGN.md): with ``a = max(x, 0)`` and ``p_i = a_i / S``::

    S  = sum_i a_i,   T = sum_i a_i log a_i    (0 log 0 = 0)
    H  = log S - T / S,   PP = exp(H),   SP = (L - PP) / (L - 1)

``H`` does not change when a row is scaled by ``c > 0``. A *dead* row (no positive value,
``S == 0``) gets ``H = log L, PP = L, SP = 0`` (the values of a uniform row) and zero
gradient. ``-inf`` is just a non-positive value; NaN or ``+inf`` in a row gives NaN. The
gradient is ``dH/dx_i = -(log a_i - T/S) / S`` for ``x_i > 0`` and exactly 0 where
``x_i <= 0`` (the ReLU convention), also in a NaN row, whose other positions get NaN.
"""


import math
from typing import NamedTuple

import torch

__all__ = ["ChannelStats", "channel_stats", "entropy", "perplexity", "sparsity",
           "accumulation_dtype", "sparsity_slope", "check_input", "row_stats",
           "entropy_derivatives", "positions", "l1_row_stats", "l1_entropy_derivatives",
           "SUPPORTED_DTYPES", "NORMALIZATIONS"]


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NORMALIZATIONS = ("softmax", "l1")

# Shifted values x_i - m are clamped from below to this: exp() of it is exactly 0 in float32
# and float64, so a masked (-inf) position adds 0 to s and t (not -inf * 0 = NaN), and
# products of it with O(1) factors stay finite in the derivatives below.
SHIFT_FLOOR = -1024.0


class ChannelStats(NamedTuple):
    """Per-(sample, channel) results, each of shape ``(N, C)``."""

    entropy: torch.Tensor
    perplexity: torch.Tensor
    sparsity: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, every other floating dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparsity_slope(length):
    """``dSP/dPP``: ``-1 / (L - 1)``, or 0 for ``L = 1``, where SP is defined as 0.

    The one Python home of the L = 1 rule: ``SP = (PP - L) * sparsity_slope(L)``.
    """
    return -1.0 / (length - 1) if length > 1 else 0.0


def positions(x: torch.Tensor):
    """``L = prod(S)``; a plain product, as ``torch.Size.numel()`` would specialise symbolic
    sizes under torch.compile and export."""
    length = 1
    for size in x.shape[2:]:
        length = length * size
    return length


def _shape(shape) -> str:
    # Printed like C++'s IntArrayRef, so that both sides raise the same text.
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_dense(t: torch.Tensor, name: str) -> None:
    if t.is_nested or t.layout != torch.strided:
        raise TypeError(f"sparsity_ext: {name} must be a dense (strided) tensor; sparse, nested "
                        f"and other layouts are not supported")


def check_input(x: torch.Tensor) -> None:
    """Raise a clear exception for input the measure is not defined on.

    The same types and texts as the native ops (csrc/host_prepare.cpp); no guard on sizes
    under torch.compile (the spatial-size check is a deferred runtime assertion).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sparsity_ext: expected a torch.Tensor, got {type(x).__name__}")
    check_dense(x, "x")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"sparsity_ext: x must be a floating-point tensor (float16, bfloat16, "
                        f"float32 or float64), got {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"sparsity_ext: x must have shape (N, C, *spatial) with at least one "
                         f"spatial dim, got shape {_shape(x.shape)}")
    length = positions(x)
    if isinstance(length, torch.SymInt):  # torch.compile, export: deferred, not a guard
        torch._check_value(length != 0,
                           lambda: "sparsity_ext: x must have at least one spatial position")
    elif length == 0:
        raise ValueError(f"sparsity_ext: x must have at least one spatial position, got shape "
                         f"{_shape(x.shape)}")


def _shifted_rows(x: torch.Tensor) -> torch.Tensor:
    """``x_i - m`` per row, ``(N, C, L)`` in the accumulation dtype, clamped to SHIFT_FLOOR."""
    rows = x.flatten(2).to(accumulation_dtype(x.dtype))
    row_max = rows.amax(dim=-1, keepdim=True).detach()
    # +inf makes the softmax undefined: a NaN shift turns the whole row NaN, values and
    # gradients alike (an all -inf row gets NaN from -inf - -inf by itself).
    row_max = torch.where(row_max == float("inf"), float("nan"), row_max)
    shifted = rows - row_max
    # `where`, unlike clamp_min, passes a NaN and its gradient through; a clamped (masked)
    # position gets gradient 0.
    return torch.where(shifted < SHIFT_FLOOR, SHIFT_FLOOR, shifted)


def _entropy_of_rows(shifted: torch.Tensor):
    weights = shifted.exp()
    s = weights.sum(dim=-1)
    t = (shifted * weights).sum(dim=-1)
    return s, t, s.log() - t / s


def channel_stats(x: torch.Tensor, normalize: str = "softmax") -> ChannelStats:
    """Entropy, perplexity and sparsity of every ``(n, c)`` row of ``x`` (see module doc).

    ``normalize``: ``"softmax"`` (the paper's measure) or ``"l1"`` (scale invariant).
    """
    if normalize == "l1":
        return _l1_channel_stats(x)
    if normalize != "softmax":
        raise ValueError(f"sparsity_ext: normalize must be one of {NORMALIZATIONS}, got "
                         f"{normalize!r}")
    check_input(x)
    _, _, entropy = _entropy_of_rows(_shifted_rows(x))
    perplexity = entropy.exp()
    sparsity = (perplexity - positions(x)) * sparsity_slope(positions(x))
    return ChannelStats(entropy.to(x.dtype), perplexity.to(x.dtype), sparsity.to(x.dtype))


def row_stats(x: torch.Tensor) -> torch.Tensor:
    """What the fused forward saves per row, ``(3, N, C)`` in the accumulation dtype: the
    row maximum, ``log s`` and ``t / s`` (see module doc)."""
    rows = x.flatten(2).to(accumulation_dtype(x.dtype))
    s, t, _ = _entropy_of_rows(_shifted_rows(x))
    return torch.stack([rows.amax(dim=-1), s.log(), t / s])


class EntropyDerivatives(NamedTuple):
    entropy: torch.Tensor    # (N, C), accumulation dtype
    gradient: torch.Tensor   # dH/dx, (N, C, L)
    hvp: torch.Tensor | None  # (d^2 H / dx dx) v for the given v, (N, C, L)


def entropy_derivatives(x: torch.Tensor, v: torch.Tensor | None = None) -> EntropyDerivatives:
    """H, its gradient and (given ``v`` of x's shape) its Hessian times ``v``, per row, in the
    accumulation dtype, computed from ``x`` alone, so differentiable again to any order.

    With ``p = softmax(x)``, ``d_i = x_i - mu``, ``a = sum_i v_i p_i d_i``,
    ``b = sum_i v_i p_i``, and ``dp_i/dx_j = p_i (delta_ij - p_j)``,
    ``dmu/dx_j = p_j (1 + d_j)``::

        dH/dx_j             = -p_j d_j
        sum_i v_i d2H/dx_i dx_j = -p_j ((v_j - b) (1 + d_j) - a)
    """
    shifted = _shifted_rows(x)
    s, t, entropy = _entropy_of_rows(shifted)
    p = shifted.exp() / s.unsqueeze(-1)
    d = shifted - (t / s).unsqueeze(-1)
    gradient = -p * d
    if v is None:
        return EntropyDerivatives(entropy, gradient, None)
    v = v.reshape(shifted.shape).to(shifted.dtype)
    a = (v * p * d).sum(dim=-1, keepdim=True)
    b = (v * p).sum(dim=-1, keepdim=True)
    return EntropyDerivatives(entropy, gradient, -p * ((v - b) * (1 + d) - a))


def entropy(x: torch.Tensor, normalize: str = "softmax") -> torch.Tensor:
    """Entropy (nats) of the spatial softmax (or L1 normalisation) of every row, ``(N, C)``."""
    return channel_stats(x, normalize).entropy


def perplexity(x: torch.Tensor, normalize: str = "softmax") -> torch.Tensor:
    """Perplexity ``exp(entropy)`` of every row, shape ``(N, C)``."""
    return channel_stats(x, normalize).perplexity


def sparsity(x: torch.Tensor, normalize: str = "softmax") -> torch.Tensor:
    """Sparsity ``(L - perplexity) / (L - 1)`` of every row, shape ``(N, C)``."""
    return channel_stats(x, normalize).sparsity


# --- the L1 measure -------------------------------------------------------------------


def _l1_sums(x: torch.Tensor):
    """``(rows, not_live, S, T/S)`` of ``x`` in the accumulation dtype; ``rows`` is
    ``(N, C, L)``, the others ``(N, C)`` except ``not_live`` (``x <= 0``, ``(N, C, L)``).

    Differentiable with the ReLU convention: both ``torch.where`` branches stay finite at
    ``x <= 0`` (log of 1, not of 0), so those positions get exactly 0 gradient, never NaN.
    NaN is live (``NaN <= 0`` is False), so it reaches S and T and poisons its row.
    """
    check_input(x)
    rows = x.flatten(2).to(accumulation_dtype(x.dtype))
    not_live = rows <= 0
    a = torch.where(not_live, 0.0, rows)
    log_a = torch.where(not_live, 0.0, torch.where(not_live, 1.0, rows).log())
    s = a.sum(dim=-1)
    t = (a * log_a).sum(dim=-1)
    # Dead rows (S == 0) divide by 1 instead: T is 0 there, so T/S is stored as 0.
    mean_log = t / torch.where(s == 0, 1.0, s)
    return rows, not_live, s, mean_log


def l1_row_stats(x: torch.Tensor) -> torch.Tensor:
    """``(4, N, C)`` per-row statistics of the L1 measure in the accumulation dtype:
    ``[S, T/S (0 for a dead row), count of x_i <= 0 (-inf included), sum_i x_i]``,
    the ``row_stats`` of ``torch.ops.sparsity_ext.l1_stats_forward``."""
    rows, not_live, s, mean_log = _l1_sums(x)
    return torch.stack([s, mean_log, not_live.sum(dim=-1).to(rows.dtype), rows.sum(dim=-1)])


def _l1_entropy(s: torch.Tensor, mean_log: torch.Tensor, length: int) -> torch.Tensor:
    """H = log S - T/S per row in the accumulation dtype; log L for a dead row (S == 0)."""
    dead = s == 0  # no positive value; a NaN row has S = NaN and is not dead
    # log of 1 on dead rows, whose value is replaced below: no inf or NaN in any gradient.
    entropy = torch.where(dead, 1.0, s).log() - mean_log
    entropy = torch.where(dead, math.log(length), entropy)
    if length == 1:
        entropy = entropy * 0  # exactly 0 (log a - (a log a)/a may round); NaN stays NaN
    return entropy


def _l1_channel_stats(x: torch.Tensor) -> ChannelStats:
    rows, _, s, mean_log = _l1_sums(x)
    length = rows.shape[-1]
    entropy = _l1_entropy(s, mean_log, length)
    perplexity = torch.where(s == 0, float(length), entropy.exp())
    sparsity = (perplexity - length) * sparsity_slope(length)
    return ChannelStats(entropy.to(x.dtype), perplexity.to(x.dtype), sparsity.to(x.dtype))


def l1_entropy_derivatives(x: torch.Tensor, v: torch.Tensor | None = None) -> EntropyDerivatives:
    """H of the L1 measure, its gradient and (given ``v`` of x's shape) its Hessian times
    ``v``, per row, in the accumulation dtype, computed from ``x`` alone (so differentiable
    again), as :func:`entropy_derivatives` does for the softmax measure.

    With the live positions ``x_i > 0``, ``l_i = log x_i``, ``m = T/S``,
    ``A = sum_live v_i (l_i - m)`` and ``B = sum_live v_i``, for live ``j``::

        dH/dx_j                 = -(l_j - m) / S
        sum_i v_i d2H/dx_i dx_j = -v_j / (x_j S) + (A + B + (l_j - m) B) / S^2

    and exactly 0 at every other position, in dead rows and when L == 1 (H is constant).
    """
    rows, not_live, s, mean_log = _l1_sums(x)
    length = rows.shape[-1]
    entropy = _l1_entropy(s, mean_log, length)
    safe_s = torch.where(s == 0, 1.0, s).unsqueeze(-1)
    log_a = torch.where(not_live, 0.0, torch.where(not_live, 1.0, rows).log())
    d = torch.where(not_live, 0.0, log_a - mean_log.unsqueeze(-1))
    constant = 0.0 if length == 1 else 1.0  # L == 1: zero, but NaN stays NaN
    gradient = -d / safe_s * constant
    if v is None:
        return EntropyDerivatives(entropy, gradient, None)
    v_live = torch.where(not_live, 0.0, v.reshape(rows.shape).to(rows.dtype))
    a = (v_live * d).sum(dim=-1, keepdim=True)
    b = v_live.sum(dim=-1, keepdim=True)
    curvature = -v_live / (torch.where(not_live, 1.0, rows) * safe_s)
    hvp = torch.where(not_live, 0.0, curvature + (a + b + d * b) / safe_s**2) * constant
    return EntropyDerivatives(entropy, gradient, hvp)
