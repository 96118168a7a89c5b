"""Fused perplexity-based activation sparsity for PyTorch.

Huesmann et al., "The Impact of Activation Sparsity on Overfitting in Convolutional
Neural Networks" (arXiv:2104.06153). See :mod:`sparsity_ext.reference` for the math.
"""

from . import reference
from .ops import (
    ChannelStats,
    ChannelStatsFunction,
    L1StatsFunction,
    NORMALIZATIONS,
    channel_stats,
    entropy,
    perplexity,
    sparsity,
)
from .monitor import SparsityMonitor, SparsityPenalty, SparsityRecord
from .overfitting import OverfittingWarning, overfitting_warning
from .early_stopping import SparsityEarlyStopping

__all__ = [
    "ChannelStats",
    "ChannelStatsFunction",
    "L1StatsFunction",
    "NORMALIZATIONS",
    "channel_stats",
    "entropy",
    "perplexity",
    "sparsity",
    "reference",
    "SparsityMonitor",
    "SparsityPenalty",
    "SparsityRecord",
    "OverfittingWarning",
    "overfitting_warning",
    "SparsityEarlyStopping",
]
__version__ = "0.1.0"
