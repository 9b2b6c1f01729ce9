"""``geometry``: the last layer's geometry of the global model and of chosen clients, per round.

Per round t (``after_aggregate``, on the new global model w_{t+1}), on a fixed seeded subset of
the central test set:

1. global model: per-class mean and spread of feature length, angle to W_y and margin, the
   same over correctly and wrongly classified samples (scalars ``global/...``), histograms of
   the three over all samples;
2. chosen clients (``clients: [partition ids]``): the client's round-t model is rebuilt on the
   server by running the client's own trainer (``fl.local_training.train_dense``) from the global
   model w_t it received, on its own partition, with the generator seed the ClientApp uses
   (``fl.sampling.seed_for(seed, t, partition)``). With the run's training settings (the
   config interpolates ``${train.*}`` and ``${seed}``) this is the model that client trained,
   whether or not it was sampled in round t, without a byte of extra traffic or any change to
   the ClientApp. Logged: delta length/angle/margin against w_t on the same samples and the
   counts of samples that flip right -> wrong and wrong -> right (``client<p>/...``);
3. corrupted inputs (``corruptions: true``): accuracy and mean length/angle/margin of the
   global model under Gaussian noise, Gaussian blur and contrast at each chosen severity
   (``corrupt/<name>/s<k>/...``), as in CIFAR-10-C.

Round 0 (``on_run_start``) logs the initial model's geometry as the baseline. ``every: k``
measures every k-th round (the last round always). Models run, and chosen clients train, on the
run's compute device (``RunView.device``); the geometry itself is computed on the CPU.

Figures (``figures: true``; ``plugins.geometry.views``, drawn by ``fl.figures``) at every measured
round, as TensorBoard images ``plugin/geometry/...`` and PNGs under ``images/geometry/`` in the run
directory (the run logger writes both):

    global/angle_vs_length, global/margin_by_class
                                          the paper's per-class views of the global model
    client<p>/shift                       a chosen client's model against the global one
    compressed/angle_vs_length, compressed/margin_by_class
                                          with the ``compression`` plugin also on (its options
                                          arrive as ``compression``): the global model beside its
                                          float compressed copies (pruned, fp16), as in the paper's
                                          comparison of pruning methods, at the rounds the
                                          compression plugin compresses (its ``every``, the last)

``global/scatter_points`` is the number of points the scatter drew (every sample with a finite
angle and length, of the first ``max_classes`` classes).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fl.hooks import Plugin, Report, RunView, register_plugin
from fl.local_training import ClientData, TrainHyper, train_dense
from fl.sampling import seed_for
from plugins.geometry.corruptions import CORRUPTIONS, corrupt
from plugins.geometry.metrics import METRICS, Geometry, finite, measure, shift, summarize
from plugins.geometry.views import class_views, shift_view

_SUBSET_TAG = 0x6E0  # seed word of the evaluation subset
_NOISE_TAG = 0xC0  # seed word of the corruption noise


@register_plugin("geometry")
class GeometryMonitor(Plugin):
    def __init__(self, samples: int = 1000, clients: Sequence[int] = (), every: int = 1,
                 corruptions: bool = False, severities: Sequence[int] = (1, 2, 3, 4, 5),
                 corruption_kinds: Sequence[str] = CORRUPTIONS, per_class: bool = True, histograms: bool = True,
                 epochs: int = 1, batch_size: int = 32, lr: float = 0.05, momentum: float = 0.0,
                 weight_decay: float = 0.0, bn_stats: str = "global", seed: int = 0, layer: str = "classifier",
                 batch: int = 500, figures: bool = True, max_classes: int = 10,
                 compression: Mapping[str, Any] | Plugin | None = None):
        if samples < 1 or every < 1:
            raise ValueError("geometry: samples and every must be >= 1")
        if max_classes < 1:
            raise ValueError(f"geometry.max_classes must be >= 1, got {max_classes}")
        unknown = sorted(set(corruption_kinds) - set(CORRUPTIONS))
        if unknown or any(not 1 <= s <= 5 for s in severities):
            raise ValueError(f"geometry: corruptions must be among {CORRUPTIONS} at severities 1..5")
        self.samples, self.clients, self.every = int(samples), [int(p) for p in clients], int(every)
        self.corruptions, self.severities = bool(corruptions), [int(s) for s in severities]
        self.corruption_kinds = list(corruption_kinds)
        self.per_class, self.histograms = bool(per_class), bool(histograms)
        self.hyper = TrainHyper(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                                momentum=float(momentum), weight_decay=float(weight_decay), bn_stats=str(bn_stats))
        self.seed, self.layer, self.batch = int(seed), layer, int(batch)
        self._previous: ArrayRecord | None = None  # w_t, the model the round's clients received
        self._previous_geometry: Geometry | None = None
        self._indices: np.ndarray | None = None
        self.figures, self.max_classes = bool(figures), int(max_classes)
        self.compression = _compression(compression)

    # -- hooks -------------------------------------------------------------------------------

    def on_run_start(self, run: RunView) -> Report | None:
        self._setup(run)
        self._previous_geometry = measure(self._load(run, run.initial_arrays), self._batches(run), self.layer)
        return self._global_report(run, self._previous_geometry)

    def after_aggregate(self, run: RunView, server_round: int, arrays: ArrayRecord) -> Report | None:
        if self._indices is None:  # a resumed run skips on_run_start; its initial arrays are the checkpoint
            self._setup(run)
        previous, previous_geometry = self._previous, self._previous_geometry
        self._previous, self._previous_geometry = arrays, None
        if server_round % self.every and server_round != run.num_rounds:
            return None
        model = self._load(run, arrays)
        geo = measure(model, self._batches(run), self.layer)
        self._previous_geometry = geo
        report = self._global_report(run, geo)
        if self.clients:
            if previous_geometry is None:
                previous_geometry = measure(self._load(run, previous), self._batches(run), self.layer)
            for partition in self.clients:
                client_model = self.client_model(run, previous, server_round, partition)
                client_geo = measure(client_model, self._batches(run), self.layer)
                self._client_report(report, run, partition, previous_geometry, client_geo)
        if self.corruptions:
            self._corruption_report(report, run, model)
        if self.figures and self.compression is not None and self.compression.runs_at(server_round, run.num_rounds):
            self._compressed_report(report, run, arrays, geo)
        return report

    # -- pieces ------------------------------------------------------------------------------

    def _setup(self, run: RunView) -> None:
        test = run.federation.test
        missing = [p for p in self.clients if not 0 <= p < run.federation.num_clients]
        if missing:
            raise ValueError(f"geometry: clients {missing} are not partitions of a {run.federation.num_clients}-client run")
        rng = np.random.default_rng([self.seed, _SUBSET_TAG])
        self._indices = np.sort(rng.choice(len(test), size=min(self.samples, len(test)), replace=False))
        self._previous = run.initial_arrays

    def client_model(self, run: RunView, received: ArrayRecord, server_round: int, partition: int) -> nn.Module:
        """The model ``partition`` trains in ``server_round`` from ``received`` (see the module docstring)."""
        model = self._load(run, received)
        data = ClientData(run.federation.train, run.federation.client_indices[partition])
        generator = torch.Generator().manual_seed(seed_for(self.seed, server_round, partition))
        train_dense(model, data, self.hyper, generator)
        return model

    @staticmethod
    def _load(run: RunView, arrays: ArrayRecord) -> nn.Module:
        """The model held in ``arrays`` on the run's compute device."""
        return run.load_global(arrays).to(run.device)

    def _batches(self, run: RunView, images: torch.Tensor | None = None):
        test = run.federation.test
        for start in range(0, len(self._indices), self.batch):
            idx = self._indices[start:start + self.batch]
            if images is None:
                yield test.get(idx)
            else:
                yield images[start:start + self.batch], torch.from_numpy(test.labels[idx])

    def _global_report(self, run: RunView, geo: Geometry) -> Report:
        scalars = {f"global/{k}": v for k, v in summarize(geo, run.federation.num_classes, self.per_class).items()}
        histograms = {}
        if self.histograms:
            histograms = {f"global/{m}": finite(getattr(geo, m)) for m in METRICS}
            histograms = {k: v for k, v in histograms.items() if v.size}
        report = Report(scalars=scalars, histograms=histograms)
        if self.figures:
            images, drawn = class_views({"global model": geo}, _class_names(run), self.max_classes, "global model")
            report.images.update({f"global/{k}": v for k, v in images.items()})
            report.scalars["global/scatter_points"] = float(drawn)
        return report

    def _client_report(self, report: Report, run: RunView, partition: int, before: Geometry, after: Geometry) -> None:
        prefix = f"client{partition}/"
        report.scalars.update({prefix + k: v for k, v in
                               shift(before, after, run.federation.num_classes, self.per_class).items()})
        report.scalars.update({prefix + k: v for k, v in summarize(after, run.federation.num_classes, False).items()
                               if k.endswith("_mean") or k == "accuracy"})
        if self.histograms:
            for metric in METRICS:
                delta = finite(getattr(after, metric) - getattr(before, metric))
                if delta.size:
                    report.histograms[f"{prefix}delta_{metric}"] = delta
        if self.figures:
            report.images[f"{prefix}shift"] = shift_view(before, after, _class_names(run), self.max_classes,
                                                         f"client {partition}")

    def _compressed_report(self, report: Report, run: RunView, arrays: ArrayRecord, geo: Geometry) -> None:
        """The global model's views beside those of its float compressed copies, on the same samples."""
        models = {"global model": geo}
        for name, compressed in self.compression.float_models(run, arrays).items():
            models[name] = measure(compressed.to(run.device), self._batches(run), self.layer)
        images, _ = class_views(models, _class_names(run), self.max_classes, "global model vs compressed")
        report.images.update({f"compressed/{k}": v for k, v in images.items()})

    def _corruption_report(self, report: Report, run: RunView, model: nn.Module) -> None:
        test = run.federation.test
        clean = test.pixels(self._indices).float() / 255.0
        mean = torch.tensor(test.mean).view(1, -1, 1, 1)
        std = torch.tensor(test.std).view(1, -1, 1, 1)
        rows = []
        for name in self.corruption_kinds:
            for severity in self.severities:
                generator = torch.Generator().manual_seed(seed_for(self.seed, _NOISE_TAG, severity))
                images = (corrupt(clean, name, severity, generator) - mean) / std
                geo = measure(model, self._batches(run, images), self.layer)
                stats = summarize(geo, run.federation.num_classes, per_class=False)
                key = f"corrupt/{name}/s{severity}/"
                for k in ("accuracy", "length_mean", "angle_mean", "margin_mean"):
                    report.scalars[key + k] = stats[k]
                rows.append(f"| {name} | {severity} | {stats['accuracy']:.3f} | {stats['length_mean']:.3f} | "
                            f"{stats['angle_mean']:.2f} | {stats['margin_mean']:.3f} |")
        report.text["corruptions"] = "\n".join(
            ["| corruption | severity | accuracy | length | angle (deg) | margin |", "|---|---|---|---|---|---|", *rows])


def _class_names(run: RunView) -> list[str]:
    names = getattr(run.federation.test, "class_names", None)
    return list(names) if names else [str(c) for c in range(run.federation.num_classes)]


def _compression(options: Mapping[str, Any] | Plugin | None):
    """The compression plugin whose models are compared (its config when ``plugins=[...,compression]``)."""
    from plugins.compression import ModelCompression

    if options is None or isinstance(options, ModelCompression):
        return options
    try:
        return ModelCompression(**{k: v for k, v in dict(options).items() if k != "_target_"})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"geometry.compression (the compression plugin's options): {exc}") from None
