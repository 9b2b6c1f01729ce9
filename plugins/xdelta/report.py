"""What a person looks at (XDELTA, Figures 7-9): overlays, a markdown summary and an HTML report.

Overlays paint the edge region in blue and the DELTA region in orange on the input (both where
they overlap, outlines on top), enlarged ``scale`` times with nearest-neighbour pixels. The HTML
report is one self-contained file: PNGs are base64-embedded, written by a 20-line encoder on the
standard library's zlib (no imaging dependency).
"""

from __future__ import annotations

import base64
import html
import struct
import zlib
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from plugins.xdelta.categories import CATEGORIES

EDGE_RGB = np.array([40, 110, 255], dtype=np.float32)  # blue
DELTA_RGB = np.array([255, 140, 0], dtype=np.float32)  # orange


def overlay(pixels: np.ndarray, edge: np.ndarray, delta: np.ndarray, scale: int = 4, alpha: float = 0.45) -> np.ndarray:
    """HWC uint8 image: ``pixels`` (CHW or HWC uint8) with the edge and DELTA regions (bool HW)."""
    img = pixels.transpose(1, 2, 0) if pixels.shape[0] in (1, 3) and pixels.ndim == 3 and pixels.shape[-1] not in (1, 3) \
        else pixels
    img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
    img = img.astype(np.float32)
    for mask, rgb in ((edge, EDGE_RGB), (delta, DELTA_RGB)):
        m = mask.astype(bool)[..., None]
        img = np.where(m, (1 - alpha) * img + alpha * rgb, img)
    img = np.kron(img, np.ones((scale, scale, 1), dtype=np.float32))
    for mask, rgb in ((edge, EDGE_RGB), (delta, DELTA_RGB)):
        big = np.kron(mask.astype(np.uint8), np.ones((scale, scale), dtype=np.uint8)).astype(bool)
        t = torch.from_numpy(big)[None, None].float()
        inner = -F.max_pool2d(-t, 3, stride=1, padding=1)[0, 0].numpy() > 0
        img[big & ~inner] = rgb
    return np.clip(img, 0, 255).astype(np.uint8)


def grid(images: list[np.ndarray], columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile HWC uint8 images (all the same size) into one image with a white gutter."""
    if not images:
        return np.full((8, 8, 3), 255, dtype=np.uint8)
    h, w, c = images[0].shape
    rows = (len(images) + columns - 1) // columns
    cols = min(columns, len(images))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k, im in enumerate(images):
        r, q = divmod(k, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = im
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG file of an HWC uint8 RGB image (8-bit truecolour, no interlace)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, c = image.shape
    if c != 3:
        raise ValueError(f"png_bytes writes RGB images, got {c} channels")
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _img_tag(image: np.ndarray, title: str = "") -> str:
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" title="{html.escape(title)}">'


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


def examples(explanation, dataset, per_category: int = 8, scale: int = 4) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """Per category: a grid of overlays of its first ``per_category`` samples and their records."""
    out = {}
    records = explanation.records()
    cats = explanation.scores.categories
    for c in CATEGORIES:
        rows = [i for i, x in enumerate(cats) if x == c][:per_category]
        if not rows:
            continue
        pixels = dataset.pixels(explanation.index[rows]).numpy()
        tiles = [overlay(pixels[k], explanation.edge_region[i].numpy(), explanation.delta_region[i].numpy(), scale)
                 for k, i in enumerate(rows)]
        out[c] = (grid(tiles), [records[i] for i in rows])
    return out


def html_report(summary: Mapping[str, Any], explanation, dataset, *, per_category: int = 8, scale: int = 4,
                studies: Mapping[str, tuple[list[str], list[list[Any]]]] | None = None,
                title: str = "XDelta report") -> str:
    """One self-contained HTML page: the summary tables, overlays per category with every score,
    and any studies (name -> (header, rows))."""
    acc = summary["accuracy"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}figure{display:inline-block;margin:4px;"
             "font-size:11px;width:" + str(dataset.image_size * scale + 8) + "px;vertical-align:top}"
             ".e{color:#286eff}.d{color:#ff8c00}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{summary['explained']} of {summary['evaluated']} evaluated samples explained (edge wrong, "
             f"{html.escape(summary['reference'])} right); accuracy "
             + ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
             + f". Object from the {html.escape(summary['object_source'])}. Regions: <span class='e'>edge "
             "(blue)</span>, <span class='d'>DELTA (orange)</span>.</p>",
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
    parts.append("<h2>Examples</h2>")
    for category, (_grid, records) in examples(explanation, dataset, per_category, scale).items():
        parts.append(f"<h3>{category}</h3>")
        idx = [r["index"] for r in records]
        pixels = dataset.pixels(np.asarray(idx)).numpy()
        position = {int(v): k for k, v in enumerate(explanation.index)}
        for k, r in enumerate(records):
            i = position[r["index"]]
            image = overlay(pixels[k], explanation.edge_region[i].numpy(), explanation.delta_region[i].numpy(), scale)
            names = explanation.class_names
            caption = (f"#{r['index']} {names[r['label']]}<br>edge: {names[r['edge_pred']]}<br>"
                       f"overlap {r['overlap']:.2f}, locality {r['locality']:.2f}")
            if "concepts" in r:
                caption += "<br>" + html.escape(", ".join(r["concepts"]) or "-")
            parts.append(f"<figure>{_img_tag(image, str(r['index']))}<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)
