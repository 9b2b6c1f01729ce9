"""``xdelta``: at the end of a DELTA run, explain why the edge fails where the base succeeds.

``plugins=[xdelta]`` with ``model=delta`` (``sim=delta_100clients``): on the final global model
(the fused edge+DELTA; ``on_run_end``) and the pair's base (loaded from the pair cache that
``model.pair`` and ``model.cache_dir`` name, interpolated by ``sim_configs/plugins/xdelta.yaml``),
on the first ``samples`` images of the central test set, the plugin runs ``analysis.analyze`` and
returns a Report: category counts, mean overlap and locality per category, missed-concept
frequencies, the opportunistic and compression tables, histograms of the per-sample scores and,
per geometric category, a figure of its first ``examples`` explained samples (input, edge and
DELTA GradCAM++ maps with their regions, both regions on the input: ``report.examples``) as
TensorBoard images ``plugin/xdelta/examples/<category>`` at the last round, which the run's logger
also writes as PNGs under ``images/xdelta/``. The self-contained HTML report (``report_file``,
default ``xdelta_report.html`` in the run directory) embeds the same figures; it goes in the
Report's files, which the run's logger writes atomically.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from flwr.app import ArrayRecord

from fl.errors import ConfigError
from fl.hooks import Plugin, Report, RunView, register_plugin
from plugins.xdelta import report as render
from plugins.xdelta.analysis import XDeltaSettings, analyze, to_report
from plugins.xdelta.categories import Thresholds
from plugins.xdelta.gradcam import DELTA_MAP_SIZE, delta_layer


EXAMPLES = "examples/"  # the Report's image keys: examples/<category> (analysis.to_report)


@register_plugin("xdelta")
class XDelta(Plugin):
    def __init__(self, samples: int = 500, reference: str = "base", batch_size: int = 100, examples: int = 8,
                 top_concepts: int = 5, thresholds: Mapping[str, Any] | None = None,
                 delta_map_size: int = DELTA_MAP_SIZE, opportunistic: bool = True,
                 gate_thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9), weak_classes: int = 3,
                 compression: bool = False, sparsities: Sequence[float] = (0.3, 0.5, 0.7), finetune_epochs: int = 2,
                 delta_epochs: int = 5, train_samples: int = 1000, pair: Mapping[str, Any] | None = None,
                 cache_dir: str = ".cache/delta", report_file: str | None = "xdelta_report.html", seed: int = 0):
        self.settings = XDeltaSettings(
            samples=int(samples), reference=str(reference), thresholds=Thresholds(**dict(thresholds or {})),
            delta_map_size=int(delta_map_size),
            batch_size=int(batch_size), examples=int(examples), top_concepts=int(top_concepts),
            opportunistic=bool(opportunistic), gate_thresholds=tuple(float(t) for t in gate_thresholds),
            weak_classes=int(weak_classes), compression=bool(compression),
            sparsities=tuple(float(s) for s in sparsities), finetune_epochs=int(finetune_epochs),
            delta_epochs=int(delta_epochs), train_samples=int(train_samples), seed=int(seed))
        if reference not in ("base", "fused"):
            raise ValueError(f"xdelta.reference must be base or fused, got {reference!r}")
        self.cache_dir, self.report_file = str(cache_dir), report_file
        self.pair = self._pair_spec(pair)  # parsed now: a bad pair option stops the run before any work
        self._latest: ArrayRecord | None = None

    def on_run_start(self, run: RunView) -> Report | None:
        """Refuse, before round 1, a model or a ``delta_map_size`` that the end of the run could not explain."""
        fused = self._fused(run, run.initial_arrays)
        test = run.federation.test
        try:
            delta_layer(fused, (test.channels, test.image_size, test.image_size), self.settings.delta_map_size)
        except ValueError as exc:
            raise ConfigError("plugins.xdelta.delta_map_size", str(exc)) from None
        return None

    def after_aggregate(self, run: RunView, server_round: int, arrays: ArrayRecord) -> Report | None:
        self._latest = arrays
        return None

    def on_run_end(self, run: RunView) -> Report | None:
        fused = self._fused(run, run.initial_arrays if self._latest is None else self._latest)
        fused.to(run.device).eval()  # explained on the run's compute device
        base, train = self._pair(run.device)
        if base is not None:
            base.to(run.device)
        result = analyze(fused, base, run.federation.test, self.settings, train)
        report = to_report(result, run.federation.test, self.settings)
        if self.report_file:  # written by the run's logger, atomically
            drawn = {k.removeprefix(EXAMPLES): v for k, v in report.images.items() if k.startswith(EXAMPLES)}
            report.files[self.report_file] = render.html_report(
                result.summary, result.explanation, run.federation.test, per_category=self.settings.examples,
                studies=result.studies, drawn=drawn)
        return report

    @staticmethod
    def _fused(run: RunView, arrays: ArrayRecord):
        from fl.delta.network import FusedDelta

        fused = run.load_global(arrays)
        if not isinstance(fused, FusedDelta):
            raise ConfigError("plugins", f"xdelta explains a fused edge+DELTA model (model=delta, e.g. "
                                         f"sim=delta_100clients); this run's model is a {type(fused).__name__}")
        return fused

    @staticmethod
    def _pair_spec(pair: Mapping[str, Any] | None):
        if not pair:
            return None
        from fl.delta.pair import PairSpec

        return PairSpec.from_options(pair, prefix="plugins.xdelta.pair")

    def _pair(self, device):
        """The pair's base and server split, or (None, None) without a pair (then edge+DELTA is the reference);
        a pair not cached yet is trained on ``device``."""
        if self.pair is None:
            return None, None
        from fl.delta.pair import ensure_pair, server_split

        pair = ensure_pair(self.pair, self.cache_dir, compute=device)
        return pair.base.eval(), server_split(self.pair)[0]

