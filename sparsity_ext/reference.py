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

Every compiled path is tested against these functions, and they are the fallback
wherever the compiled extension is not available. Differentiable by autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ChannelStats", "channel_stats", "entropy", "perplexity", "sparsity",
           "accumulation_dtype", "check_input", "SUPPORTED_DTYPES"]


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def channel_stats(x: torch.Tensor) -> ChannelStats:
    """Entropy, perplexity and sparsity of every ``(n, c)`` row of ``x`` (see module doc)."""
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


def entropy(x: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the spatial softmax of every row, shape ``(N, C)``."""
    return channel_stats(x).entropy


def perplexity(x: torch.Tensor) -> torch.Tensor:
    """Perplexity ``exp(entropy)`` of every row, shape ``(N, C)``."""
    return channel_stats(x).perplexity


def sparsity(x: torch.Tensor) -> torch.Tensor:
    """Sparsity ``(L - perplexity) / (L - 1)`` of every row, shape ``(N, C)``."""
    return channel_stats(x).sparsity
