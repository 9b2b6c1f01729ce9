"""Compression for edge clients and for transmission.

- Model compression (plugin ``compression``, ``plugins.compression.plugin``): structured
  pruning with torch-pruning, unstructured magnitude pruning, post-training quantization, each
  measured against the original (accuracy, size, parameters, MACs) on the final global model.
- Update compression for transmission lives with the other codecs in ``fl.payload`` (``int8``,
  ``topk_<ratio>``, ``topk_<ratio>+int8`` / ``+fp16``, error feedback on the client): choose it
  with ``codec.up=<name>`` for any strategy.
"""

from plugins.compression.plugin import ModelCompression, Row, table
from plugins.compression.techniques import (load_pruned, quantize, save_pruned, structured_prune,
                                            unstructured_prune)

__all__ = ["ModelCompression", "Row", "load_pruned", "quantize", "save_pruned", "structured_prune", "table",
           "unstructured_prune"]
