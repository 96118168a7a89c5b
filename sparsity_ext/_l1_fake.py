"""Fake (shape-only) kernels of the L1 ops, for opcheck and torch.compile.

Kept apart from ops.py until the L1 measure is wired into the public API; ops.py's
``register_fake_kernels`` is where these belong then.

- ``l1_stats_forward(x) -> (entropy, perplexity, sparsity, row_stats)``: three ``(N, C)``
  in x's dtype and ``row_stats`` ``(4, N, C)`` in the accumulation dtype.
- ``l1_stats_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity) -> grad_x``,
  dense in the layout x is read in (as for channel_stats_backward).
"""

from __future__ import annotations

import torch

from . import reference
from .ops import _grad_x_like

_registered = False


def register_l1_fake_kernels() -> None:
    """Register once; needs the compiled library loaded (the op schemas come from it)."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("sparsity_ext::l1_stats_forward")
    def _l1_forward_fake(x):
        reference.check_input(x)
        n, c = x.shape[0], x.shape[1]
        acc = reference.accumulation_dtype(x.dtype)
        return (x.new_empty((n, c)), x.new_empty((n, c)), x.new_empty((n, c)),
                x.new_empty((4, n, c), dtype=acc))

    @torch.library.register_fake("sparsity_ext::l1_stats_backward")
    def _l1_backward_fake(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity):
        reference.check_input(x)
        return _grad_x_like(x)
