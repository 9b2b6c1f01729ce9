"""``agilenn``: AgileNN split training in the federation, and its per-round measurements
(Huang and Gao, MobiCom 2022).

Choosing the plugin (``plugins=[agilenn]``) selects, through its config's defaults list,
``strategy=agilenn`` (``strategies.agilenn``: pretraining, Algorithm 1, then AgileNN rounds with
the remote head averaged or trained by split learning) and ``model=agilenn``
(``plugins.agilenn.network``); the client side is the ``agilenn`` trainer
(``clients.agilenn_trainer``). This class is the monitoring half: after every aggregation it
measures the new global split network on a fixed seeded subset of the central test set and
returns (logged under ``plugin/agilenn/``):

    skewness            mean share of the importance in the k local channels (target: rho)
    disorder_rate       share of samples with a remote channel above a local one
    alpha               sigmoid(w / T)
    local_accuracy, remote_accuracy, combined_accuracy
    bytes_per_sample    mean length of a sample's coded remote features (``fl.payload``)
    raw_bytes_per_sample the same features as fp32, for comparison
    captum_max_abs_diff  our differentiable IG against captum's on ``captum_samples`` images
    step_overhead       (after_round) the clients' AgileNN step time over a plain step's,
                        measured on the clients (``train/step_overhead``, sample-weighted)
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from fl.hooks import Plugin, Report, RunView, register_plugin
from plugins.agilenn.importance import captum_ig, integrated_gradients
from plugins.agilenn.training import AgileHyper, AgileLoss, measure

_SUBSET_TAG = 0xA611  # seed word of the evaluation subset


@register_plugin("agilenn")
class AgileNNMonitor(Plugin):
    def __init__(self, samples: int = 500, captum_samples: int = 8, rho: float = 0.8, lam: float = 0.8,
                 seed: int = 0, batch: int = 250):
        if samples < 1 or batch < 1 or captum_samples < 0:
            raise ValueError("agilenn: samples and batch must be >= 1, captum_samples >= 0")
        self.samples, self.captum_samples, self.batch = int(samples), int(captum_samples), int(batch)
        self.hyper = AgileHyper(rho=float(rho), lam=float(lam))
        self.seed = int(seed)
        self._indices: np.ndarray | None = None

    def on_run_start(self, run: RunView) -> Report | None:
        return self.after_aggregate(run, 0, run.initial_arrays)

    def after_aggregate(self, run: RunView, server_round: int, arrays: ArrayRecord) -> Report | None:
        test = run.federation.test
        if self._indices is None:
            rng = np.random.default_rng([self.seed, _SUBSET_TAG])
            self._indices = np.sort(rng.choice(len(test), size=min(self.samples, len(test)), replace=False))
        model = run.load_global(arrays).to(run.device)  # measured on the run's compute device
        model.freeze_reference(True)
        agile = AgileLoss(self.hyper, run.federation.num_classes)
        batches = [test.get(self._indices[s:s + self.batch]) for s in range(0, len(self._indices), self.batch)]
        scalars = measure(model, batches, agile)
        scalars.pop("loss")
        if self.captum_samples:
            x, y = (t[:self.captum_samples].to(run.device) for t in batches[0])
            with torch.no_grad():
                f = model.extractor(x)
            ours = integrated_gradients(model.reference, f, y, agile.cache, run.federation.num_classes, create_graph=False)
            theirs = captum_ig(model.reference, f, y)
            scalars["captum_max_abs_diff"] = float((ours.detach() - theirs).abs().max())
        return Report(scalars=scalars)

    def after_round(self, run: RunView, server_round: int, row) -> Report | None:
        overhead = row.get("train/step_overhead")
        return Report(scalars={"step_overhead": float(overhead)}) if overhead is not None else None
