"""Opportunistic DELTA (XDELTA, Section 6 and Figure 16b): run the DELTA only when it should help.

XDelta names the classes the edge is weak at (the true classes of the most explained samples:
edge wrong, base right). The edge runs on every input; when its softmax probability for any weak
class reaches ``threshold`` the DELTA runs too and the fused prediction replaces the edge's.
Compute per input: edge MACs, plus the DELTA's MACs (subgraph, SE, proj, resizer, adapter:
``fl.delta.network.delta_macs``; the fused forward reuses the edge's features) on triggered
inputs. Compared with edge-only, always-DELTA and base-only.

The paper gates on the edge's logits; a logit has no fixed scale across models, so the gate here
reads the softmax of the logits (a documented choice), and the threshold is swept.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor


def weak_classes(labels: np.ndarray, k: int) -> list[int]:
    """The ``k`` true classes with the most explained samples (ties: the lower class id)."""
    counts = Counter(int(c) for c in labels)
    return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def gate(edge_logits: Tensor, weak: Sequence[int], threshold: float) -> Tensor:
    """bool [N]: the edge's softmax probability of some weak class >= ``threshold``."""
    if not weak:
        return torch.zeros(len(edge_logits), dtype=torch.bool)
    return edge_logits.softmax(1)[:, list(weak)].amax(1) >= threshold


def study(edge_logits: Tensor, fused_logits: Tensor, base_logits: Tensor | None, labels: np.ndarray,
          weak: Sequence[int], thresholds: Sequence[float], macs: dict[str, int]) -> list[dict[str, Any]]:
    """Accuracy and mean MACs per input for edge-only, each gate threshold, always-DELTA and base-only."""
    y = torch.from_numpy(np.asarray(labels))
    acc = lambda pred: float((pred == y).float().mean()) if len(y) else float("nan")  # noqa: E731
    edge_pred, fused_pred = edge_logits.argmax(1), fused_logits.argmax(1)
    rows = [{"policy": "edge only", "threshold": None, "triggered": 0.0, "accuracy": acc(edge_pred),
             "macs": float(macs["edge"])}]
    for t in thresholds:
        on = gate(edge_logits, weak, t)
        rate = float(on.float().mean()) if len(on) else 0.0
        rows.append({"policy": "opportunistic", "threshold": float(t), "triggered": rate,
                     "accuracy": acc(torch.where(on, fused_pred, edge_pred)),
                     "macs": macs["edge"] + rate * macs["delta"]})
    rows.append({"policy": "edge+DELTA always", "threshold": None, "triggered": 1.0, "accuracy": acc(fused_pred),
                 "macs": float(macs["edge"] + macs["delta"])})
    if base_logits is not None:
        rows.append({"policy": "base only", "threshold": None, "triggered": None, "accuracy": acc(base_logits.argmax(1)),
                     "macs": float(macs["base"])})
    return rows
