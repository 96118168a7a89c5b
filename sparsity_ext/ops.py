# Placeholder until the compiled operator lands: the public API over the reference.
from .reference import ChannelStats, channel_stats, entropy, perplexity, sparsity

ChannelStatsFunction = None
