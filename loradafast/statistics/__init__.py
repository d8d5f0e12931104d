"""Stage 1, the statistics pass (docs/design.md §1, §3): which batches, which losses, the hooks
that accumulate G, Y and Z, and the :class:`Statistics` they produce (saved and loaded here).

* :mod:`.batches`: whatever a loader yields → model inputs, labels and a token mask;
* :mod:`.losses`: per-sequence losses the pass differentiates;
* :mod:`.hooks`: the forward/backward hooks and their accumulators;
* :mod:`.collector`: :func:`collect`, the pass itself;
* :mod:`.sums`: :class:`Statistics` / :class:`LayerStats` and their file format.
"""
from .collector import collect, is_causal_lm
from .sums import LayerStats, MissingStatisticsError, Statistics

__all__ = ["LayerStats", "MissingStatisticsError", "Statistics", "collect", "is_causal_lm"]
