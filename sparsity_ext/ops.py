"""The public operator: autograd over the fused kernels, with the reference as fallback.

Two native ops live in the ``sparsity_ext`` namespace (schemas in csrc/ops.cpp):

- ``channel_stats_forward(x) -> (entropy, perplexity, sparsity, row_stats)``
- ``channel_stats_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity) -> grad_x``

``row_stats`` (3, N, C) holds each row's max, log-sum and mean shift in the accumulation
dtype: all the one-pass backward needs, so no softmax is ever stored.
"""

from __future__ import annotations

import torch

from . import _extension, reference
from .reference import ChannelStats

__all__ = ["ChannelStats", "ChannelStatsFunction", "channel_stats", "entropy", "perplexity",
           "sparsity"]


def _grad_x_like(x: torch.Tensor) -> torch.Tensor:
    """Mirror of resolve_layout/allocate_dense_like in csrc/launch.cpp: grad_x is dense,
    channels innermost when x has unit channel stride and is not unit position stride."""

    def positions_strided_by(step: int) -> bool:
        expected = step
        for d in range(x.dim() - 1, 1, -1):
            if x.shape[d] == 1:
                continue
            if x.stride(d) != expected:
                return False
            expected *= x.shape[d]
        return True

    if not positions_strided_by(1) and x.shape[1] > 1 and x.stride(1) == 1:
        inner = [d for d in range(2, x.dim()) if x.shape[d] > 1]
        if positions_strided_by(x.stride(inner[-1])):
            perm = [0, *range(2, x.dim()), 1]
            inverse = [0, x.dim() - 1, *range(1, x.dim() - 1)]
            return x.new_empty([x.shape[d] for d in perm]).permute(inverse)
    return x.new_empty(x.shape)


_fakes_registered = False


def register_fake_kernels() -> None:
    """Shape/dtype-only kernels so torch.compile and opcheck can trace the native ops."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("sparsity_ext::channel_stats_forward")
    def _forward_fake(x):
        reference.check_input(x)
        n, c = x.shape[0], x.shape[1]
        acc = reference.accumulation_dtype(x.dtype)
        return (x.new_empty((n, c)), x.new_empty((n, c)), x.new_empty((n, c)),
                x.new_empty((3, n, c), dtype=acc))

    @torch.library.register_fake("sparsity_ext::channel_stats_backward")
    def _backward_fake(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity):
        reference.check_input(x)
        return _grad_x_like(x)


class ChannelStatsFunction(torch.autograd.Function):
    """Differentiable (entropy, perplexity, sparsity) of x, each (N, C), through the fused ops.

    Forward saves only x and the (3, N, C) row statistics; backward is one elementwise pass.
    """

    @staticmethod
    def forward(ctx, x):
        entropy, perplexity, sparsity, row_stats = torch.ops.sparsity_ext.channel_stats_forward(x)
        ctx.save_for_backward(x, row_stats)
        return entropy, perplexity, sparsity

    @staticmethod
    def backward(ctx, grad_entropy, grad_perplexity, grad_sparsity):
        if not ctx.needs_input_grad[0]:
            return None
        x, row_stats = ctx.saved_tensors
        return torch.ops.sparsity_ext.channel_stats_backward(
            x, row_stats, grad_entropy, grad_perplexity, grad_sparsity)


def channel_stats(x: torch.Tensor) -> ChannelStats:
    """Entropy, perplexity and sparsity of the spatial softmax of every (sample, channel).

    Args:
        x: ``(N, C, *S)`` with at least one spatial dim, float16/bfloat16/float32/float64,
            any strides, any device.

    Returns:
        ``ChannelStats(entropy, perplexity, sparsity)``, each ``(N, C)`` in x's dtype and
        device, accumulated in float32 (float64 for float64). With ``L = prod(S)`` and
        ``p = softmax(x[n, c].flatten())``: ``H = -sum p log p``, ``PP = exp(H)``,
        ``SP = (L - PP) / (L - 1)`` (0 when L == 1). Differentiable.
    """
    reference.check_input(x)
    if not _extension.kernel_available(x.device.type):
        return reference.channel_stats(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return ChannelStats(*ChannelStatsFunction.apply(x))
    # Nothing to differentiate: skip autograd.Function's bookkeeping (the monitor's case).
    entropy, perplexity, sparsity, _ = torch.ops.sparsity_ext.channel_stats_forward(x)
    return ChannelStats(entropy, perplexity, sparsity)


def entropy(x: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the spatial softmax of every row of ``x`` ``(N, C, *S)`` -> ``(N, C)``."""
    return channel_stats(x).entropy


def perplexity(x: torch.Tensor) -> torch.Tensor:
    """Perplexity ``exp(entropy)``, in ``[1, L]``, of every row of ``x`` -> ``(N, C)``."""
    return channel_stats(x).perplexity


def sparsity(x: torch.Tensor) -> torch.Tensor:
    """Sparsity ``(L - perplexity) / (L - 1)``, in ``[0, 1]``, of every row -> ``(N, C)``."""
    return channel_stats(x).sparsity
