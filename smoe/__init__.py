"""smoe: a reproducible workflow for Spatial Mixture-of-Experts experiments."""

__version__ = "0.1.0"
