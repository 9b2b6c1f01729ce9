"""What a person looks at (XDELTA, Figures 7-9): example figures, a markdown summary and an HTML report.

Examples are grouped by geometric category; each explained sample is one row of a figure drawn by
``fl.figures.map_examples``: the input, the edge model's GradCAM++ map with its region outlined,
the DELTA's map with its region, and both regions on the input. The same figures go to TensorBoard
(``plugin/xdelta/examples/<category>``, through the run's logger, which also writes them as PNGs
under ``images/xdelta/``) and into the HTML report, one self-contained file with the PNGs
base64-embedded (encoded by Pillow, ``fl.figures.png_bytes``).
"""

from __future__ import annotations

import base64
import html
from typing import Any, Mapping

import numpy as np

from fl import figures
from plugins.xdelta.categories import CATEGORIES


def _hwc(pixels: np.ndarray) -> np.ndarray:
    """A CHW (or HWC) uint8 image as HWC RGB."""
    img = pixels.transpose(1, 2, 0) if pixels.ndim == 3 and pixels.shape[0] in (1, 3) and pixels.shape[-1] not in (1, 3) \
        else pixels
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def example_rows(explanation, dataset, rows: list[int]) -> list[figures.MapExample]:
    """The figure rows of explained samples ``rows`` (positions in ``explanation``): the input,
    both GradCAM++ maps and both regions, captioned with the sample's classes and scores."""
    if not rows:
        return []
    pixels = dataset.pixels(explanation.index[rows]).numpy()
    names = explanation.class_names
    out = []
    for k, i in enumerate(rows):
        caption = (f"#{int(explanation.index[i])} {names[int(explanation.labels[i])]}\n"
                   f"edge: {names[int(explanation.edge_pred[i])]}\n"
                   f"overlap {float(explanation.scores.overlap[i]):.2f}, "
                   f"locality {float(explanation.scores.locality[i]):.2f}")
        out.append(figures.MapExample(_hwc(pixels[k]), explanation.edge_maps[i].numpy(),
                                      explanation.delta_maps[i].numpy(), explanation.edge_region[i].numpy(),
                                      explanation.delta_region[i].numpy(), caption))
    return out


def _img_tag(image: np.ndarray, title: str = "") -> str:
    data = base64.b64encode(figures.png_bytes(image)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(title)}" title="{html.escape(title)}">'


def markdown_summary(summary: Mapping[str, Any]) -> str:
    """The category table and the top missed concepts as markdown (TensorBoard text)."""
    acc = summary["accuracy"]
    lines = [f"explained {summary['explained']} of {summary['evaluated']} samples (edge wrong, {summary['reference']} "
             f"right); accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()),
             "", "| category | count | mean overlap | mean locality |", "|---|---:|---:|---:|"]
    for c in CATEGORIES:
        row = summary["categories"][c]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {c} | {row['count']} | {fmt(row['mean_overlap'])} | {fmt(row['mean_locality'])} |")
    lines += ["", diffuse_line(summary)]
    if "top_concepts" in summary:
        lines += ["", "top missed concepts (share of explained samples whose DELTA region covers the part): "
                  + ", ".join(f"{n} {f:.2f}" for n, f in summary["top_concepts"])]
        lines += ["", "| class | top missed concepts |", "|---|---|"]
        for cls, top in summary["top_concepts_per_class"].items():
            lines.append(f"| {cls} | " + ", ".join(f"{n} {f:.2f}" for n, f in top) + " |")
    return "\n".join(lines)


def diffuse_line(summary: Mapping[str, Any]) -> str:
    """How many DELTA regions cover most of the image (flat or coarse maps: their categories say little)."""
    area = summary["median_area"]
    median = "" if area["delta"] is None else (f"; median region share of the image: DELTA {area['delta']:.3f}, "
                                               f"edge {area['edge']:.3f}")
    line = (f"diffuse DELTA regions (>= {summary['thresholds']['diffuse_area']:.2f} of the image): "
            f"{summary['diffuse']} of {summary['explained']}{median}")
    if summary["explained"] and summary["diffuse"] * 2 > summary["explained"]:
        line += (" -- most DELTA maps are flat or coarser than the object (a larger delta_map_size reads a finer "
                 "DELTA layer), so their overlap measures the edge region's area, not where the DELTA looked")
    return line


def examples(explanation, dataset, per_category: int = 8, drawn: Mapping[str, np.ndarray] | None = None
             ) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """Per category: the figure (HWC uint8) of its first ``per_category`` samples, one row each
    (``fl.figures.map_examples``; taken from ``drawn`` when given there), and their records."""
    out = {}
    records = explanation.records()
    cats = explanation.scores.categories
    for c in CATEGORIES:
        every = [i for i, x in enumerate(cats) if x == c]
        rows = every[:per_category]
        if not rows:
            continue
        image = (drawn or {}).get(c)
        if image is None:
            image = figures.to_rgb(figures.map_examples(example_rows(explanation, dataset, rows),
                                                        title=f"{c}: {len(rows)} of {len(every)} explained samples"))
        out[c] = (image, [records[i] for i in rows])
    return out


def html_report(summary: Mapping[str, Any], explanation, dataset, *, per_category: int = 8,
                studies: Mapping[str, tuple[list[str], list[list[Any]]]] | None = None,
                title: str = "XDelta report", drawn: Mapping[str, np.ndarray] | None = None) -> str:
    """One self-contained HTML page: the summary tables, the example figure of each category with
    every sample's scores, and any studies (name -> (header, rows)). ``drawn``: the category
    figures already drawn by ``examples`` (for the TensorBoard images), so they are not drawn twice."""
    acc = summary["accuracy"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}figure{margin:4px 0}"
             "img{max-width:100%;height:auto}"
             ".e{color:#2a8fc9}.d{color:#c98500}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{summary['explained']} of {summary['evaluated']} evaluated samples explained (edge wrong, "
             f"{html.escape(summary['reference'])} right); accuracy "
             + ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
             + f". Object from the {html.escape(summary['object_source'])}. Regions: <span class='e'>edge "
             "(solid blue outline)</span>, <span class='d'>DELTA (dashed orange outline)</span>.</p>",
             "<h2>Geometric categories</h2>",
             _table([[c, r["count"], r["mean_overlap"], r["mean_locality"]] for c, r in summary["categories"].items()],
                    ["category", "count", "mean overlap", "mean locality"]),
             f"<p>{html.escape(diffuse_line(summary))}</p>",
             "<p>Thresholds: " + html.escape(", ".join(f"{k}={v}" for k, v in summary["thresholds"].items())) + "</p>"]
    if "top_concepts" in summary:
        parts += ["<h2>Most frequently missed concepts</h2>",
                  _table([["(all)", ", ".join(f"{n} {f:.2f}" for n, f in summary["top_concepts"])]]
                         + [[c, ", ".join(f"{n} {f:.2f}" for n, f in top)]
                            for c, top in summary["top_concepts_per_class"].items()],
                         ["class", "concepts (share of explained samples)"])]
    for name, (header, rows) in (studies or {}).items():
        parts += [f"<h2>{html.escape(name)}</h2>", _table(rows, header)]
    parts.append("<h2 id='examples'>Examples</h2><p>Per explained sample: the input, the edge model's and the DELTA's "
                 "GradCAM++ maps with their regions outlined, and both regions on the input.</p>")
    for category, (image, records) in examples(explanation, dataset, per_category, drawn).items():
        parts += [f"<h3 id='{category}'>{category}</h3>", f"<figure>{_img_tag(image, category)}</figure>",
                  _table([_record_row(r, explanation.class_names) for r in records], _record_header(explanation))]
    parts.append("</body></html>")
    return "\n".join(parts)


def _record_header(explanation) -> list[str]:
    return ["index", "class", "edge prediction", "overlap", "locality", "DELTA area"] + (
        ["concepts"] if explanation.concepts is not None else [])


def _record_row(r: Mapping[str, Any], names: list[str]) -> list[Any]:
    row = [r["index"], r["class"], names[r["edge_pred"]], r["overlap"], r["locality"], r["delta_area"]]
    return row + ([", ".join(r["concepts"]) or "-"] if "concepts" in r else [])


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)
