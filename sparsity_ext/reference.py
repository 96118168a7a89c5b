"""Perplexity-based activation sparsity in plain PyTorch: the specification in code.

For ``x`` of shape ``(N, C, *S)`` every row ``x[n, c]`` is flattened to its
``L = prod(S)`` spatial positions and, relative to the row maximum ``m``::

    s  = sum_i exp(x_i - m)
    t  = sum_i (x_i - m) * exp(x_i - m)
    H  = log s - t / s                 # entropy of softmax(x[n, c]) in nats
    PP = exp(H)                        # perplexity, 1 <= PP <= L
    SP = (L - PP) / (L - 1)            # sparsity, 0 (uniform) .. 1 (one-hot); 0 if L == 1

Sums are taken relative to the row maximum so that rows far from zero keep their
precision. ``-inf`` positions are masked (probability 0, zero gradient); NaN or
``+inf`` anywhere in a row, or a row of only ``-inf``, gives NaN for that row.

With ``normalize="l1"`` the row is normalised by its L1 norm instead (the scale-invariant
companion of DESIGN.md): with ``a = max(x, 0)`` and ``p_i = a_i / S``::

    S  = sum_i a_i,   T = sum_i a_i log a_i    (0 log 0 = 0)
    H  = log S - T / S,   PP = exp(H),   SP = (L - PP) / (L - 1)

``H`` does not change when a row is scaled by ``c > 0``. A *dead* row (no positive value,
``S == 0``) gets ``H = log L, PP = L, SP = 0`` (the values of a uniform row) and zero
gradient. ``-inf`` is just a non-positive value; NaN or ``+inf`` in a row gives NaN. The
gradient is ``dH/dx_i = -(log a_i - T/S) / S`` for ``x_i > 0`` and exactly 0 where
``x_i <= 0`` (the ReLU convention), also in a NaN row, whose other positions get NaN.

Every compiled path is tested against these functions, and they are the fallback
wherever the compiled extension is not available. Differentiable by autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["ChannelStats", "channel_stats", "entropy", "perplexity", "sparsity",
           "l1_row_stats", "l1_entropy_derivatives", "accumulation_dtype", "check_input", "SUPPORTED_DTYPES",
           "NORMALIZATIONS"]


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NORMALIZATIONS = ("softmax", "l1")


class ChannelStats(NamedTuple):
    """Per-(sample, channel) results, each of shape ``(N, C)``."""

    entropy: torch.Tensor
    perplexity: torch.Tensor
    sparsity: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, every other floating dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(x: torch.Tensor) -> None:
    """Raise a clear exception for input the measure is not defined on."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if x.dim() < 3:
        raise ValueError(
            f"expected a tensor of shape (N, C, *spatial) with at least one spatial dim, "
            f"got {x.dim()} dims of shape {tuple(x.shape)}"
        )
    if x.shape[2:].numel() == 0:
        raise ValueError(
            f"the softmax is taken over the spatial positions, but shape {tuple(x.shape)} "
            f"has zero spatial positions"
        )


def channel_stats(x: torch.Tensor, normalize: str = "softmax") -> ChannelStats:
    """Entropy, perplexity and sparsity of every ``(n, c)`` row of ``x`` (see module doc).

    ``normalize``: ``"softmax"`` (the paper's measure) or ``"l1"`` (scale invariant).
    """
    if normalize == "l1":
        return _l1_channel_stats(x)
    if normalize != "softmax":
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    check_input(x)
    acc = accumulation_dtype(x.dtype)
    rows = x.flatten(2).to(acc)
    length = rows.shape[-1]
    row_max = rows.amax(dim=-1, keepdim=True)
    # A masked (-inf) position gives shifted = -inf; clamping it to the lowest finite value
    # keeps exp() at 0 and makes shifted * exp(shifted) 0 instead of -inf * 0 = NaN.
    shifted = (rows - row_max).clamp_min(torch.finfo(acc).min)
    weights = shifted.exp()
    s = weights.sum(dim=-1)
    t = (shifted * weights).sum(dim=-1)
    entropy = s.log() - t / s
    perplexity = entropy.exp()
    if length > 1:
        sparsity = (length - perplexity) / (length - 1)
    else:
        # L == 1: one position always holds all mass; sparsity is defined as 0 (NaN stays NaN).
        sparsity = perplexity * 0
    return ChannelStats(entropy.to(x.dtype), perplexity.to(x.dtype), sparsity.to(x.dtype))


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
    if length > 1:
        sparsity = (length - perplexity) / (length - 1)
    else:
        sparsity = perplexity * 0
    return ChannelStats(entropy.to(x.dtype), perplexity.to(x.dtype), sparsity.to(x.dtype))


def l1_entropy_derivatives(x: torch.Tensor, v: torch.Tensor | None = None):
    """H of the L1 measure, its gradient and (given ``v`` of x's shape) its Hessian times
    ``v``, per row, in the accumulation dtype, computed from ``x`` alone (so differentiable
    again): ``(entropy (N, C), gradient (N, C, L), hvp (N, C, L) or None)``.

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
        return entropy, gradient, None
    v_live = torch.where(not_live, 0.0, v.reshape(rows.shape).to(rows.dtype))
    a = (v_live * d).sum(dim=-1, keepdim=True)
    b = v_live.sum(dim=-1, keepdim=True)
    curvature = -v_live / (torch.where(not_live, 1.0, rows) * safe_s)
    hvp = torch.where(not_live, 0.0, curvature + (a + b + d * b) / safe_s**2) * constant
    return entropy, gradient, hvp
