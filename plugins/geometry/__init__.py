"""Geometry-metric monitoring (Li et al., "Understanding Robustness Lottery"): length, angle and
margin of the features entering the final linear layer, for the global model and chosen clients.

- ``plugins.geometry.metrics``: per-sample geometry from a forward hook, summaries, shifts
- ``plugins.geometry.corruptions``: CIFAR-10-C-style Gaussian noise, blur and contrast
- ``plugins.geometry.plugin``: the ``geometry`` plugin (``plugins=[geometry]``)
"""

from plugins.geometry.metrics import Geometry, capture_linear_io, measure, sample_geometry, shift, summarize
from plugins.geometry.plugin import GeometryMonitor

__all__ = ["Geometry", "GeometryMonitor", "capture_linear_io", "measure", "sample_geometry", "shift", "summarize"]
