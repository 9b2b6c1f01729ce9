"""Missed concepts of compressed edges (XDELTA, Section 5.4 and Figure 11).

One base and the edge pruned at increasing sparsities (structured, torch-pruning with per-filter
L2 importance: ``plugins.compression.structured_prune``, the classifier's outputs kept). Each
pruned edge is fine-tuned briefly on the pair's server split, gets its own DELTA (the original
DELTA's subgraph, SE and projection as the starting point, a fresh resizer and adapter for the
pruned edge's feature sizes, trained with ``fl.delta.construct.train_delta``: MSE to the base's
features + FNC + group lasso [+ CE], edge and base frozen), and is explained like the original
pair. The result: missed-concept frequencies per model side by side.

A simulation convenience: fine-tuning and DELTA training use the pair's server split, which the
clients never see.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fl.compute import model_device
from plugins.xdelta.categories import Thresholds
from plugins.xdelta.gradcam import DELTA_MAP_SIZE
from plugins.xdelta.pipeline import Explanation, explain


def pruned_fused(fused: nn.Module, base: nn.Module, sparsity: float, x: Tensor, y: Tensor, *, finetune_epochs: int,
                 delta_epochs: int, seed: int) -> nn.Module:
    """A fused model whose edge is ``fused.edge`` pruned to ``sparsity`` and whose DELTA is retrained for it."""
    from fl.delta.construct import DeltaTrainSettings, train_delta
    from fl.delta.network import FusedDelta
    from fl.delta.pair import Recipe, train_classifier
    from plugins.compression.techniques import structured_prune

    torch.manual_seed(seed)
    edge = structured_prune(fused.edge, x[:1], sparsity)
    for p in edge.parameters():
        p.requires_grad_(True)
    if finetune_epochs > 0:
        train_classifier(edge, x, y, Recipe(epochs=finetune_epochs, lr=0.01), seed)
    edge.eval()
    with torch.no_grad():
        pool = edge.features(x[:1]).shape[1]
        feat = edge.forward_features(x[:1]).shape[1]
    arch = replace(fused.arch, edge_pool_dim=int(pool), edge_feat_dim=int(feat))
    model = FusedDelta(arch, edge=edge).to(model_device(edge))
    keep = {k: v for k, v in fused.state_dict().items() if k.startswith(("delta.", "classifier."))}
    model.load_state_dict(keep, strict=False)
    train_delta(model, base, x, y, DeltaTrainSettings(epochs=delta_epochs), seed)
    return model.eval()


def compression_study(fused: nn.Module, base: nn.Module, train_set, test_set, indices: np.ndarray,
                      thresholds: Thresholds, *, sparsities: Sequence[float] = (0.3, 0.5, 0.7),
                      finetune_epochs: int = 2, delta_epochs: int = 5, train_samples: int = 1000,
                      seed: int = 0, original: Explanation | None = None,
                      delta_map_size: int = DELTA_MAP_SIZE) -> dict[str, Any]:
    """Per model (the original edge and each pruned one): accuracy, explained count and concept frequencies."""
    from fl.models import model_profile

    n = min(train_samples, len(train_set))
    x, y = (t.to(model_device(fused)) for t in train_set.get(np.arange(n)))  # trained where the models are
    results: dict[str, Any] = {}
    models = [("edge", 0.0, fused)]
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise ValueError(f"xdelta.compression.sparsities must be in (0, 1), got {s}")
        started = time.perf_counter()
        models.append((f"edge pruned {s:.0%}", s, pruned_fused(fused, base, s, x, y, finetune_epochs=finetune_epochs,
                                                              delta_epochs=delta_epochs, seed=seed)))
        models[-1] = models[-1] + (time.perf_counter() - started,)
    for entry in models:
        name, sparsity, model = entry[:3]
        e = original if (sparsity == 0.0 and original is not None) else explain(model, base, test_set, indices,
                                                                               thresholds,
                                                                               delta_map_size=delta_map_size)
        profile = model_profile(model.edge, test_set.channels, test_set.image_size)
        results[name] = {"sparsity": sparsity, "edge_params": profile["params"], "edge_macs": profile["macs"],
                         "accuracy": e.predictions.accuracy(), "explained": len(e),
                         "concepts": e.concept_counts.frequency() if e.concept_counts is not None else {},
                         "build_seconds": round(entry[3], 1) if len(entry) > 3 else 0.0}
    return results


def side_by_side(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): one row per concept, one column per model (share of that model's explained samples)."""
    names = list(results)
    concepts = sorted({c for r in results.values() for c in r["concepts"]},
                      key=lambda c: -max(r["concepts"].get(c, 0.0) for r in results.values()))
    header = ["concept"] + names
    rows = [["edge accuracy"] + [results[m]["accuracy"]["edge"] for m in names],
            ["edge+DELTA accuracy"] + [results[m]["accuracy"]["fused"] for m in names],
            ["edge params"] + [results[m]["edge_params"] for m in names],
            ["explained samples"] + [results[m]["explained"] for m in names]]
    rows += [[c] + [round(results[m]["concepts"].get(c, 0.0), 4) for m in names] for c in concepts]
    return header, rows
