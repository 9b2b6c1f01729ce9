"""XDelta end to end: explanation, summary, studies and what gets logged (XDELTA, Sections 4-6).

``analyze`` runs the pipeline on a fused edge+DELTA model and a base (``pipeline.explain``), then
the optional compression study (Figure 11) and opportunistic study (Figure 16b); ``to_report``
turns the result into a ``fl.hooks.Report`` (scalars, score histograms, example figures, markdown
tables) for the run logger; ``html`` renders the self-contained report file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from torch import nn

from fl.hooks import Report
from plugins.xdelta import report as render
from plugins.xdelta.categories import CATEGORIES, Thresholds
from plugins.xdelta.compression_study import compression_study, side_by_side
from plugins.xdelta.gradcam import DELTA_MAP_SIZE
from plugins.xdelta.opportunistic import study, weak_classes
from plugins.xdelta.pipeline import Explanation, explain, predict


@dataclass(frozen=True)
class XDeltaSettings:
    samples: int = 500  # test images evaluated (the first ones; explained: edge wrong, reference right)
    reference: str = "base"  # base | fused (edge+DELTA)
    thresholds: Thresholds = Thresholds()
    delta_map_size: int = DELTA_MAP_SIZE  # GradCAM++ on the DELTA's last layer with a map this large (0: its last)
    batch_size: int = 100
    examples: int = 8  # overlays per category
    top_concepts: int = 5
    opportunistic: bool = True
    gate_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    weak_classes: int = 3
    compression: bool = False
    sparsities: tuple[float, ...] = (0.3, 0.5, 0.7)
    finetune_epochs: int = 2
    delta_epochs: int = 5
    train_samples: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1 or self.batch_size < 1 or self.examples < 0 or self.weak_classes < 0:
            raise ValueError("xdelta: samples and batch_size must be >= 1, examples and weak_classes >= 0")
        if self.delta_map_size < 0:
            raise ValueError(f"xdelta.delta_map_size must be >= 0 (0: the DELTA's last layer), got {self.delta_map_size}")


@dataclass
class Result:
    explanation: Explanation
    summary: dict[str, Any]
    studies: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def analyze(fused: nn.Module, base: nn.Module | None, test_set, s: XDeltaSettings, train_set=None) -> Result:
    from fl.delta.network import delta_macs
    from fl.models import model_profile

    n = min(s.samples, len(test_set))
    indices = np.arange(n)
    e = explain(fused, base, test_set, indices, s.thresholds, reference=s.reference, batch_size=s.batch_size,
                delta_map_size=s.delta_map_size)
    result = Result(e, e.summary(s.top_concepts))
    if s.opportunistic:
        held = np.arange(n, len(test_set)) if len(test_set) > n else indices  # weak classes come from `indices`
        preds = predict(fused, base, test_set, held)
        weak = weak_classes(e.labels, s.weak_classes)
        macs = {"edge": model_profile(fused.edge, test_set.channels, test_set.image_size)["macs"],
                "delta": delta_macs(fused.arch)}
        if base is not None:
            macs["base"] = model_profile(base, test_set.channels, test_set.image_size)["macs"]
        rows = study(preds.edge, preds.fused, preds.base, preds.labels, weak, s.gate_thresholds, macs)
        result.raw["opportunistic"] = {"weak_classes": [e.class_names[c] for c in weak], "evaluated": len(held),
                                       "macs": macs, "rows": rows}
        result.studies[f"Opportunistic DELTA (weak classes: {', '.join(e.class_names[c] for c in weak)}; "
                       f"{len(held)} held-out test images)"] = (
            ["policy", "threshold", "triggered", "accuracy", "MACs per image"],
            [[r["policy"], r["threshold"], r["triggered"], r["accuracy"], int(r["macs"])] for r in rows])
    if s.compression:
        if base is None or train_set is None:
            raise ValueError("xdelta.compression needs the base model and the pair's server split")
        results = compression_study(fused, base, train_set, test_set, indices, s.thresholds, sparsities=s.sparsities,
                                    finetune_epochs=s.finetune_epochs, delta_epochs=s.delta_epochs,
                                    train_samples=s.train_samples, seed=s.seed, original=e,
                                    delta_map_size=s.delta_map_size)
        result.raw["compression"] = results
        result.studies["Missed concepts of pruned edges (share of each model's explained samples)"] = \
            side_by_side(results)
    return result


def to_report(result: Result, test_set, s: XDeltaSettings) -> Report:
    e, summary = result.explanation, result.summary
    report = Report()
    sc = report.scalars
    sc["explained"], sc["evaluated"] = float(summary["explained"]), float(summary["evaluated"])
    sc["diffuse"] = float(summary["diffuse"])
    for k, v in summary["accuracy"].items():
        sc[f"accuracy/{k}"] = v
    for c in CATEGORIES:
        row = summary["categories"][c]
        sc[f"count/{c}"] = float(row["count"])
        if row["count"]:
            sc[f"mean_overlap/{c}"], sc[f"mean_locality/{c}"] = row["mean_overlap"], row["mean_locality"]
    if e.concept_counts is not None:
        for name, freq in e.concept_counts.frequency().items():
            sc[f"concept/{name}"] = freq
    if len(e):
        report.histograms = {"overlap": e.scores.overlap.numpy(), "locality": e.scores.locality.numpy(),
                             "delta_area": e.scores.delta_area.numpy(), "edge_area": e.scores.edge_area.numpy()}
    if s.examples:
        for category, (image, _records) in render.examples(e, test_set, s.examples).items():
            report.images[f"examples/{category}"] = image
    report.text["summary"] = render.markdown_summary(summary)
    report.text["scores"] = _scores_table(e.records())
    for key, (header, rows) in result.studies.items():
        name = "opportunistic" if key.startswith("Opportunistic") else "compression"
        report.text[name] = key + "\n\n" + _markdown(header, rows)
    for r in result.raw.get("opportunistic", {}).get("rows", []):
        tag = r["policy"].replace(" ", "_").replace("+", "_") + ("" if r["threshold"] is None else f"_t{r['threshold']}")
        sc[f"opportunistic/{tag}/accuracy"], sc[f"opportunistic/{tag}/macs"] = r["accuracy"], r["macs"]
    for model, r in result.raw.get("compression", {}).items():
        tag = model.replace(" ", "_").replace("%", "pct")
        for concept, freq in r["concepts"].items():
            sc[f"compression/{tag}/concept/{concept}"] = freq
        sc[f"compression/{tag}/accuracy_edge"] = r["accuracy"]["edge"]
    return report


def html(result: Result, test_set, s: XDeltaSettings, title: str = "XDelta report") -> str:
    return render.html_report(result.summary, result.explanation, test_set, per_category=s.examples,
                              studies=result.studies, title=title)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def _scores_table(records: list[dict[str, Any]]) -> str:
    header = ["index", "class", "edge", "category", "overlap", "locality", "delta area", "concepts"]
    rows = [[r["index"], r["class"], r["edge_pred"], r["category"], r["overlap"], r["locality"], r["delta_area"],
             ", ".join(r.get("concepts", []))] for r in records]
    return _markdown(header, rows)
