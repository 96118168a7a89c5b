"""Fused perplexity-based activation sparsity for PyTorch.

Huesmann et al., "The Impact of Activation Sparsity on Overfitting in Convolutional
Neural Networks" (arXiv:2104.06153). See :mod:`sparsity_ext.reference` for the math.
"""

from . import reference
from .ops import (
    ChannelStats,
    ChannelStatsFunction,
    channel_stats,
    entropy,
    perplexity,
    sparsity,
)

__all__ = [
    "ChannelStats",
    "ChannelStatsFunction",
    "channel_stats",
    "entropy",
    "perplexity",
    "sparsity",
    "reference",
]
__version__ = "0.1.0"
