"""Semantic categories: which concepts the edge misses (XDELTA, Section 4.3 and Figure 9).

Where a dataset has part labels (the synthetic scenes: ``background``, ``body`` and each named
part), the DELTA region of an explained sample inherits the label of every part it covers:
part p is inherited when at least ``part_coverage`` of p's pixels lie in the DELTA region
(coverage is measured against the part's own size so that a 2-pixel part and the 80-pixel body
are judged alike; a documented choice, the paper says "overlaps"). Counting inherited labels over
the explained samples, overall and per true class, gives the most frequently missed concepts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ConceptCounts:
    """How often each concept was inherited, overall and per class, and over how many samples."""

    names: list[str]
    overall: Counter = field(default_factory=Counter)
    per_class: dict[int, Counter] = field(default_factory=dict)
    samples: int = 0
    samples_per_class: Counter = field(default_factory=Counter)

    def add(self, label: int, concepts: list[str]) -> None:
        self.samples += 1
        self.samples_per_class[label] += 1
        self.overall.update(concepts)
        self.per_class.setdefault(label, Counter()).update(concepts)

    def frequency(self, label: int | None = None) -> dict[str, float]:
        """Share of explained samples (of a class) whose DELTA region inherits each concept, high first."""
        counts, n = (self.overall, self.samples) if label is None else (
            self.per_class.get(label, Counter()), self.samples_per_class[label])
        return {name: c / n for name, c in counts.most_common()} if n else {}

    def top(self, k: int = 5, label: int | None = None) -> list[tuple[str, float]]:
        return list(self.frequency(label).items())[:k]


def part_coverage(delta: Tensor, parts: Tensor, num_parts: int) -> Tensor:
    """coverage[b, p] = |D n P_p| / |P_p| (0 where part p is absent), for D bool [B, H, W] and part ids [B, H, W]."""
    onehot = torch.nn.functional.one_hot(parts.long(), num_parts).bool()  # [B, H, W, P]
    size = onehot.flatten(1, 2).sum(1).double()
    inside = (onehot & delta.bool()[..., None]).flatten(1, 2).sum(1).double()
    return torch.where(size > 0, inside / size.clamp_min(1.0), torch.zeros_like(size)).float()


def inherited(coverage: Tensor, names: list[str], threshold: float) -> list[list[str]]:
    """Per sample, the names of the parts covered at least ``threshold`` (> 0)."""
    hits = (coverage >= threshold) & (coverage > 0)
    return [[names[p] for p in torch.nonzero(row).flatten().tolist()] for row in hits]
