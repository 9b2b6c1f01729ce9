"""AgileNN split training (Huang and Gao, "Real-time Neural Network Inference on Extremely Weak
Devices: Agile Offloading with Explainable AI", MobiCom 2022).

- ``network``: the split network (extractor, local head, quantized remote head, alpha) and the
  frozen reference; registered as ``model=agilenn``
- ``importance``: differentiable 2-point integrated gradients, the per-class zero-baseline
  cache, captum's IG for monitoring
- ``losses``: skewness and disorder losses, the combined objective
- ``selection``: Algorithm 1 (initial channel selection by top-k counts, filter permutation)
- ``quantize``: learned centroids with a straight-through estimator
- ``training``: the pretraining / AgileNN / plain steps, overhead timing, measurements
- ``plugin``: the ``agilenn`` plugin (``plugins=[agilenn]``), per-round monitoring
The lossless coder of the quantized features lives in ``fl.payload`` (AgileNN section);
the federated parts in ``strategies.agilenn`` and ``clients.agilenn_trainer``.
"""

from plugins.agilenn.network import AgileNet, agilenn
from plugins.agilenn.plugin import AgileNNMonitor

__all__ = ["AgileNNMonitor", "AgileNet", "agilenn"]
