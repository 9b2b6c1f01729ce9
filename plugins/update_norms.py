"""``update_norms``: how far each round moves the global model, layer by layer.

The smallest useful plugin and the template for new ones: one server hook
(``after_aggregate``) returning a ``Report``. Per round it logs ||w_{t+1} - w_t||_2 for the
whole model and per parameter tensor, and the relative step ||dw|| / ||w_t||. A collapsing or
exploding step is the first thing to look at when a small model stalls where a big one learns.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from fl.hooks import Plugin, Report, RunView, register_plugin


@register_plugin("update_norms")
class UpdateNorms(Plugin):
    def __init__(self, per_layer: bool = True):
        self.per_layer = per_layer
        self._previous: dict[str, torch.Tensor] | None = None

    def on_run_start(self, run: RunView) -> Report | None:
        self._previous = _floats(run.initial_arrays)
        return None

    def after_aggregate(self, run: RunView, server_round: int, arrays: ArrayRecord) -> Report | None:
        current = _floats(arrays)
        previous, self._previous = self._previous, current
        deltas = {k: (current[k] - previous[k]).norm().item() for k in current}
        total = float(np.sqrt(sum(d * d for d in deltas.values())))
        before = float(np.sqrt(sum(v.norm().item() ** 2 for v in previous.values())))
        scalars = {"update_l2": total, "relative_update": total / before if before > 0 else float("nan")}
        if self.per_layer:
            scalars.update({f"layer/{k}": d for k, d in deltas.items()})
        return Report(scalars=scalars, histograms={"layer_update_l2": np.array(list(deltas.values()))})


def _floats(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in arrays.to_torch_state_dict().items() if v.is_floating_point()}
