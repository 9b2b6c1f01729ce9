"""The XDELTA pipeline on one (fused edge+DELTA, base) pair and a dataset (Wang and Nirjon,
XDELTA, Section 4, Figure 6):

    1. predictions of the edge, the fused edge+DELTA and the base on the chosen samples;
    2. the explained samples: edge wrong, reference right (the base; or edge+DELTA when no base
       is given or ``reference="fused"``);
    3. GradCAM++ maps (``gradcam``): the DELTA for the fused prediction, the edge for its own
       prediction, the base for its prediction when the object must come from it;
    4. regions (``regions``), geometric scores and categories (``categories``);
    5. semantic categories where the dataset has part masks (``concepts``).

Returns an ``Explanation`` holding every per-sample score, so reports log scores, not only labels.
The models run where they are (the compute device their caller put them on, ``fl.compute``):
predictions and GradCAM++ maps come back to the CPU, where regions and scores are computed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fl.compute import model_device
from plugins.xdelta.categories import CATEGORIES, GeometricScores, Thresholds, geometric_scores
from plugins.xdelta.concepts import ConceptCounts, inherited, part_coverage
from plugins.xdelta.gradcam import DELTA_MAP_SIZE, Explainers
from plugins.xdelta.regions import threshold_regions

REFERENCES = ("base", "fused")


@dataclass
class Predictions:
    """Logits of the three models on the evaluated samples (also what the opportunistic study reads)."""

    index: np.ndarray
    labels: np.ndarray
    edge: Tensor
    fused: Tensor
    base: Tensor | None

    def accuracy(self) -> dict[str, float]:
        y = torch.from_numpy(self.labels)
        out = {"edge": _acc(self.edge, y), "fused": _acc(self.fused, y)}
        if self.base is not None:
            out["base"] = _acc(self.base, y)
        return out


@dataclass
class Explanation:
    predictions: Predictions
    reference: str
    index: np.ndarray  # dataset indices of the explained samples
    labels: np.ndarray
    edge_pred: np.ndarray
    fused_pred: np.ndarray
    delta_maps: Tensor  # [N, H, W]
    edge_maps: Tensor
    delta_region: Tensor  # bool [N, H, W]
    edge_region: Tensor
    object_region: Tensor
    delta_region_count: Tensor  # int [N]
    edge_region_count: Tensor
    object_source: str  # "mask" or "base"
    scores: GeometricScores
    thresholds: Thresholds
    class_names: list[str]
    part_names: list[str] | None = None
    coverage: Tensor | None = None  # [N, parts]
    concepts: list[list[str]] | None = None
    concept_counts: ConceptCounts | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)

    def records(self) -> list[dict[str, Any]]:
        """One JSON-able row per explained sample: every score next to its category."""
        rows = []
        for i in range(len(self)):
            row = {"index": int(self.index[i]), "label": int(self.labels[i]),
                   "class": self.class_names[int(self.labels[i])],
                   "edge_pred": int(self.edge_pred[i]), "fused_pred": int(self.fused_pred[i]),
                   "category": self.scores.categories[i], "overlap": float(self.scores.overlap[i]),
                   "locality": float(self.scores.locality[i]), "delta_area": float(self.scores.delta_area[i]),
                   "edge_area": float(self.scores.edge_area[i]),
                   "delta_regions": int(self.delta_region_count[i]), "edge_regions": int(self.edge_region_count[i])}
            if self.concepts is not None:
                row["concepts"] = self.concepts[i]
                row["coverage"] = {n: round(float(c), 4) for n, c in zip(self.part_names, self.coverage[i]) if c > 0}
            rows.append(row)
        return rows

    def summary(self, top: int = 5) -> dict[str, Any]:
        """Counts and mean scores per category, accuracies, top missed concepts overall and per class."""
        cats = self.scores.categories
        counts = Counter(cats)
        per_category = {}
        for c in CATEGORIES:
            rows = [i for i, x in enumerate(cats) if x == c]
            per_category[c] = {"count": len(rows),
                               "mean_overlap": float(self.scores.overlap[rows].mean()) if rows else None,
                               "mean_locality": float(self.scores.locality[rows].mean()) if rows else None}
        out: dict[str, Any] = {
            "evaluated": int(len(self.predictions.index)), "explained": len(self), "reference": self.reference,
            "object_source": self.object_source, "accuracy": self.predictions.accuracy(),
            "categories": per_category, "category_counts": dict(counts), "seconds": round(self.seconds, 3),
            "diffuse": int((self.scores.delta_area >= self.thresholds.diffuse_area).sum()),
            "median_area": {"delta": float(self.scores.delta_area.median()) if len(self) else None,
                            "edge": float(self.scores.edge_area.median()) if len(self) else None},
            "thresholds": self.thresholds.__dict__,
        }
        if self.concept_counts is not None:
            cc = self.concept_counts
            out["top_concepts"] = cc.top(top)
            out["top_concepts_per_class"] = {self.class_names[c]: cc.top(top, c) for c in sorted(cc.per_class)}
        return out


def _acc(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")


@torch.no_grad()
def predict(fused: nn.Module, base: nn.Module | None, dataset, indices: np.ndarray, batch_size: int = 200) -> Predictions:
    fused.eval()
    if base is not None:
        base.eval()
    edge_l, fused_l, base_l = [], [], []
    device = model_device(fused)
    for start in range(0, len(indices), batch_size):
        x, _ = dataset.get(indices[start:start + batch_size])
        x = x.to(device)
        edge_l.append(fused.edge(x).cpu())
        fused_l.append(fused(x).cpu())
        if base is not None:
            base_l.append(base(x.to(model_device(base))).cpu())
    empty = torch.zeros(0, getattr(fused.classifier, "out_features", 0))
    cat = lambda parts: torch.cat(parts) if parts else empty  # noqa: E731
    return Predictions(np.asarray(indices), np.asarray(dataset.labels[indices]), cat(edge_l), cat(fused_l),
                       None if base is None else cat(base_l))


def explain(fused: nn.Module, base: nn.Module | None, dataset, indices: np.ndarray, thresholds: Thresholds, *,
            reference: str = "base", batch_size: int = 100, predictions: Predictions | None = None,
            delta_map_size: int = DELTA_MAP_SIZE) -> Explanation:
    """Explain every sample of ``dataset[indices]`` that the edge gets wrong and the reference right
    (``delta_map_size``: which DELTA layer, ``gradcam.delta_layer``)."""
    if reference not in REFERENCES:
        raise ValueError(f"xdelta.reference must be one of {REFERENCES}, got {reference!r}")
    if reference == "base" and base is None:
        reference = "fused"
    has_masks = bool(getattr(dataset, "has_masks", False))
    if not has_masks and base is None:
        raise ValueError("xdelta: locality needs the dataset's object masks or a base model; this dataset has no "
                         "masks and no base was given")
    started = time.perf_counter()
    indices = np.asarray(indices, dtype=np.int64)
    preds = predictions if predictions is not None else predict(fused, base, dataset, indices)
    y = torch.from_numpy(preds.labels)
    ref_logits = preds.base if reference == "base" else preds.fused
    chosen = ((preds.edge.argmax(1) != y) & (ref_logits.argmax(1) == y)).numpy()
    index = preds.index[chosen]
    edge_pred, fused_pred = preds.edge.argmax(1).numpy()[chosen], preds.fused.argmax(1).numpy()[chosen]
    cams = Explainers(fused, base if not has_masks else None, delta_map_size=delta_map_size,
                      input_shape=(dataset.channels, dataset.image_size, dataset.image_size))
    maps: dict[str, list[Tensor]] = {"delta": [], "edge": [], "object": [], "parts": []}
    device = model_device(fused)
    for start in range(0, len(index), batch_size):
        batch = slice(start, start + batch_size)
        x, _ = dataset.get(index[batch])
        x = x.to(device)
        maps["delta"].append(cams.delta_cam.attribute(x, torch.from_numpy(fused_pred[batch]).to(device)).cpu())
        maps["edge"].append(cams.edge_cam.attribute(x, torch.from_numpy(edge_pred[batch]).to(device)).cpu())
        if has_masks:
            obj, parts = dataset.masks(index[batch])
            maps["object"].append(obj)
            maps["parts"].append(parts)
        else:
            base_pred = preds.base.argmax(1).numpy()[chosen][batch]
            base_device = model_device(cams.base)
            base_map = cams.base_cam.attribute(x.to(base_device), torch.from_numpy(base_pred).to(base_device)).cpu()
            maps["object"].append(_regions(base_map, thresholds).mask)
    size = dataset.image_size
    stack = lambda name, dtype=torch.float32: (torch.cat(maps[name]) if maps[name]  # noqa: E731
                                               else torch.zeros(0, size, size, dtype=dtype))
    delta_maps, edge_maps = stack("delta"), stack("edge")
    delta_r, edge_r = _regions(delta_maps, thresholds), _regions(edge_maps, thresholds)
    obj = stack("object", torch.bool)
    scores = geometric_scores(delta_r.mask, edge_r.mask, obj, thresholds)
    out = Explanation(preds, reference, index, preds.labels[chosen], edge_pred, fused_pred, delta_maps, edge_maps,
                      delta_r.mask, edge_r.mask, obj, delta_r.count, edge_r.count,
                      "mask" if has_masks else "base", scores, thresholds,
                      list(getattr(dataset, "class_names", [str(c) for c in range(dataset.num_classes)])))
    part_names = getattr(dataset, "part_names", None)
    if has_masks and part_names:
        parts = stack("parts", torch.int64)
        out.part_names = list(part_names)
        out.coverage = part_coverage(delta_r.mask, parts, len(part_names))
        out.concepts = inherited(out.coverage, out.part_names, thresholds.part_coverage)
        counts = ConceptCounts(out.part_names)
        for label, concepts, category in zip(out.labels, out.concepts, scores.categories):
            if category != "NONE":  # a negligible DELTA region inherits nothing
                counts.add(int(label), concepts)
        out.concept_counts = counts
    out.seconds = time.perf_counter() - started
    return out


def _regions(maps: Tensor, t: Thresholds):
    return threshold_regions(maps, t.region_fraction, t.min_region_pixels)
