"""Few-step IMM sampling: time grids, the pushforward and restart samplers, and GraphedSampler
(the whole loop as one CUDA graph)."""

from .graphs import GraphedSampler
from .samplers import GRID_KINDS, SAMPLERS, pushforward, restart, time_grid

__all__ = ["time_grid", "pushforward", "restart", "GraphedSampler", "GRID_KINDS", "SAMPLERS"]
