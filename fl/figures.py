"""Figures for people: one home for how the project draws (matplotlib, Agg backend) and encodes
images (Pillow), so that plugins, the comparison and the benchmarks draw alike.

Every figure carries axis labels with units and a legend; series are told apart by marker and
line style as well as colour (``series_style``), so a greyscale print still separates them.
A figure leaves this module either as a PNG file (``save_png``) or as an RGB array for
TensorBoard's image tab (``to_rgb``); both close it.

What the plugins draw here:
    angle_length_scatter, margin_boxes, geometry_shift   last-layer geometry (plugin geometry)
    accuracy_tradeoff                                     accuracy vs size and MACs (plugin compression)
    map_examples                                          GradCAM++ maps and regions (plugin xdelta)
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on the machines this runs on; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402

# Okabe-Ito colours (distinguishable with colour-vision deficiencies), each paired with its own
# marker and line style so that series stay apart in greyscale.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)))
DPI = 110


def series_style(i: int) -> dict:
    """Colour, marker and line style of the i-th series (cycles after eight)."""
    n = len(COLOURS)
    return {"color": COLOURS[i % n], "marker": MARKERS[i % n], "linestyle": LINESTYLES[i % n]}


def class_style(i: int) -> dict:
    """Like ``series_style`` but distinct for many more series (classes): past eight, the marker
    shifts against the colour, so class 8 is not drawn like class 0."""
    n = len(COLOURS)
    return {"color": COLOURS[i % n], "marker": MARKERS[(i + i // n) % n]}


def new_figure(width: float = 6.4, height: float = 4.2, ncols: int = 1, nrows: int = 1, **kwargs):
    """A figure and its axes (an array of axes when there is more than one)."""
    return plt.subplots(nrows, ncols, figsize=(width, height), dpi=DPI, **kwargs)


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
               title: str = "", xlog: bool = False, width: float = 6.4, height: float = 4.2) -> Figure:
    """One line per named series of (x, y) points, with markers, a legend and a grid."""
    fig, ax = new_figure(width, height)
    for i, (name, (x, y)) in enumerate(series.items()):
        style = series_style(i)
        ax.plot(list(x), list(y), label=name, markersize=4, linewidth=1.5, markevery=_markevery(len(x)), **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xlog:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def _markevery(n: int) -> int:
    return max(1, n // 12)


def to_rgb(fig: Figure) -> np.ndarray:
    """The figure as an ``[H, W, 3]`` uint8 array (TensorBoard's ``dataformats="HWC"``); closes it."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def save_png(fig: Figure, path: str | os.PathLike) -> str:
    """Write the figure as a PNG (through a temporary file, so no half-written image is left); closes it."""
    return write_png(to_rgb(fig), path)


def write_png(image: np.ndarray, path: str | os.PathLike) -> str:
    """Write an ``[H, W]`` or ``[H, W, 3]`` uint8 array as a PNG file, atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def png_bytes(image: np.ndarray) -> bytes:
    """An ``[H, W]`` or ``[H, W, 3]`` uint8 array encoded as PNG bytes (e.g. for an HTML data URI)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- counting what a figure holds (for tests and for the logged point counts) -----------------------

def scatter_points(fig: Figure) -> int:
    """How many scatter points the figure draws: the offsets of every scatter collection in it
    (subfigures included), counted from the figure itself rather than from the data given."""
    from matplotlib.collections import PathCollection

    count = 0
    for ax in fig.get_axes():
        for collection in ax.collections:
            if isinstance(collection, PathCollection):
                count += len(collection.get_offsets())
    return count


# -- last-layer geometry (Li et al., "Understanding Robustness Lottery") ----------------------------

@dataclass(frozen=True)
class FeatureGeometry:
    """Per-sample geometry of the features entering a final linear layer, one entry per sample:
    length ||x||, angle to the true class direction W_y (degrees), signed margin to the nearest
    decision boundary of the true class, true label and whether the model got the sample right."""

    length: np.ndarray
    angle: np.ndarray
    margin: np.ndarray
    labels: np.ndarray
    correct: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> "FeatureGeometry":
        return FeatureGeometry(self.length[mask], self.angle[mask], self.margin[mask], self.labels[mask],
                               self.correct[mask])


ANGLE_LABEL = "angle to $W_y$ (degrees)"
LENGTH_LABEL = "feature length $\\|x\\|$ (feature units)"
MARGIN_LABEL = "margin to the nearest boundary (feature units)"
CORRECT_STYLE = {"marker": "o", "color": COLOURS[0], "s": 9, "alpha": 0.55, "linewidths": 0}
WRONG_STYLE = {"marker": "x", "color": COLOURS[1], "s": 14, "alpha": 0.9, "linewidths": 0.9}


def angle_length_scatter(models: Mapping[str, FeatureGeometry], class_names: Sequence[str], *,
                         max_classes: int = 10, columns: int = 5, title: str = "") -> Figure:
    """Per-class scatter of angle against length, correct (filled circles) and wrong (crosses)
    samples apart: the per-class views of Li et al., "Understanding Robustness Lottery" (angle
    and length of the penultimate features per class). Several models (e.g. dense and pruned)
    are stacked as rows of panels on the same axis ranges, so they compare side by side.
    Samples with a non-finite angle or length (a zero feature vector) have no point; every
    other sample of the first ``max_classes`` classes is one point (``scatter_points``)."""
    classes = _shown_classes(models, class_names, max_classes)
    columns = max(1, min(columns, len(classes)))
    rows = -(-len(classes) // columns)
    fig = plt.figure(figsize=(2.2 * columns + 0.4, (2.0 * rows + 0.5) * len(models) + 0.5), dpi=DPI,
                     layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(len(models), 1))
    xlim, ylim = _limits([g.angle for g in models.values()]), _limits([g.length for g in models.values()])
    for subfig, (name, geo) in zip(subfigs, models.items()):
        axes = np.atleast_1d(subfig.subplots(rows, columns, squeeze=False)).ravel()
        for ax, c in zip(axes, classes):
            mine = geo.subset((geo.labels == c) & np.isfinite(geo.angle) & np.isfinite(geo.length))
            for style, mask, label in ((CORRECT_STYLE, mine.correct, "correct"),
                                       (WRONG_STYLE, ~mine.correct, "wrong")):
                ax.scatter(mine.angle[mask], mine.length[mask], label=label, **style)
            ax.set_title(f"{class_names[c]}\n{int(mine.correct.sum())} of {len(mine)} right", fontsize="x-small")
            ax.set_xlim(xlim)
            ax.set_ylim(ylim)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize="x-small")
        for ax in axes[len(classes):]:
            ax.set_visible(False)
        subfig.supxlabel(ANGLE_LABEL, fontsize="small")
        subfig.supylabel(LENGTH_LABEL, fontsize="small")
        acc = 100.0 * geo.correct.mean() if len(geo) else float("nan")
        subfig.suptitle(f"{name}: accuracy {acc:.1f}% on {len(geo)} samples", fontsize="medium")
    handles = [plt.Line2D([], [], linestyle="", marker=s["marker"], color=s["color"], label=label)
               for s, label in ((CORRECT_STYLE, "correct"), (WRONG_STYLE, "wrong"))]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def margin_boxes(models: Mapping[str, FeatureGeometry], class_names: Sequence[str], *, max_classes: int = 10,
                 title: str = "") -> Figure:
    """Margin distributions per class as box plots (median, quartiles, 1.5 IQR whiskers, outliers),
    one box per model in each class (the paper's per-class margin comparison across pruning
    methods); models differ by hatching and edge colour. A margin below zero is a misclassified
    sample; the dashed line at zero is the decision boundary."""
    classes = _shown_classes(models, class_names, max_classes)
    fig, ax = new_figure(min(13.0, max(5.0, 0.5 * len(classes) * max(1, len(models)) + 1.5)), 4.4)
    width = 0.8 / max(1, len(models))
    hatches = ("", "///", "...", "xx", "\\\\", "oo")
    handles = []
    for m, (name, geo) in enumerate(models.items()):
        data = [_finite(geo.margin[geo.labels == c]) for c in classes]
        positions = np.arange(len(classes)) + (m - (len(models) - 1) / 2) * width
        style = series_style(m)
        boxes = ax.boxplot(data, positions=positions, widths=width * 0.85, patch_artist=True, manage_ticks=False,
                           flierprops={"marker": style["marker"], "markersize": 2.5, "alpha": 0.5,
                                       "markeredgecolor": style["color"]},
                           medianprops={"color": "black", "linewidth": 1.2})
        for patch in boxes["boxes"]:
            patch.set(facecolor=_tint(style["color"]), edgecolor=style["color"], hatch=hatches[m % len(hatches)])
        handles.append(Patch(facecolor=_tint(style["color"]), edgecolor=style["color"],
                                                hatch=hatches[m % len(hatches)], label=name))
    boundary = ax.axhline(0.0, color="black", linestyle="--", linewidth=1, label="decision boundary (margin 0)")
    ax.set_xticks(np.arange(len(classes)), [class_names[c] for c in classes], rotation=30, ha="right",
                  fontsize="small")
    ax.set_xlabel("true class")
    ax.set_ylabel(MARGIN_LABEL)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(handles=handles + [boundary], loc="best", fontsize="small")
    ax.set_title(title or "margin per class (< 0: misclassified)")
    fig.tight_layout()
    return fig


SHIFT_GROUPS = ("right in both", "wrong in both", "right -> wrong", "wrong -> right")


def geometry_shift(before: FeatureGeometry, after: FeatureGeometry, class_names: Sequence[str], *,
                   before_name: str = "global", after_name: str = "client", max_classes: int = 10) -> Figure:
    """How a second model sees the same samples differently (the paper's comparison of a model
    against a reference, here a client's model against the global one). Left: each class's mean
    (angle, length) moving from the first model (hollow marker) to the second (filled, arrow).
    Right: every sample's margin under both models; off the diagonal the margin changed, and the
    quadrants off the main ones are the samples that flipped (right -> wrong, wrong -> right)."""
    if len(before) != len(after) or not np.array_equal(before.labels, after.labels):
        raise ValueError("geometry_shift compares two measurements of the same samples")
    fig, (left, right) = new_figure(11.0, 5.2, ncols=2)
    for i, c in enumerate(_shown_classes({"": before}, class_names, max_classes)):
        mask = before.labels == c
        start = (np.nanmean(before.angle[mask]), np.nanmean(before.length[mask]))
        end = (np.nanmean(after.angle[mask]), np.nanmean(after.length[mask]))
        style = class_style(i)
        left.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": style["color"], "lw": 1.2})
        left.plot(*start, marker=style["marker"], color=style["color"], markerfacecolor="none", linestyle="")
        left.plot(*end, marker=style["marker"], color=style["color"], linestyle="", label=class_names[c])
    left.set_xlabel(ANGLE_LABEL + ", class mean")
    left.set_ylabel(LENGTH_LABEL + ", class mean")
    left.set_title(f"class means: {before_name} (hollow) -> {after_name} (filled)", fontsize="medium")
    left.grid(True, alpha=0.3)
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="x-small", ncols=5, frameon=False)
    groups = {SHIFT_GROUPS[0]: before.correct & after.correct, SHIFT_GROUPS[1]: ~before.correct & ~after.correct,
              SHIFT_GROUPS[2]: before.correct & ~after.correct, SHIFT_GROUPS[3]: ~before.correct & after.correct}
    finite = np.isfinite(before.margin) & np.isfinite(after.margin)
    for i, (name, mask) in enumerate(groups.items()):
        style = series_style(i)
        mask = mask & finite
        right.scatter(before.margin[mask], after.margin[mask], marker=style["marker"], color=style["color"], s=10,
                      alpha=0.6, linewidths=0, label=f"{name} ({int(mask.sum())})")
    lo, hi = _limits([before.margin[finite], after.margin[finite]])
    right.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1, label="no change")
    right.axhline(0, color="black", linewidth=0.6)
    right.axvline(0, color="black", linewidth=0.6)
    right.set_xlim(lo, hi)
    right.set_ylim(lo, hi)
    right.set_xlabel(f"margin, {before_name} model (feature units)")
    right.set_ylabel(f"margin, {after_name} model (feature units)")
    right.set_title("per-sample margin (< 0: misclassified)", fontsize="medium")
    right.grid(True, alpha=0.3)
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="x-small", ncols=3, frameon=False)
    fig.tight_layout()
    return fig


def _shown_classes(models: Mapping[str, FeatureGeometry], class_names: Sequence[str], max_classes: int) -> list[int]:
    present = sorted({int(c) for g in models.values() for c in np.unique(g.labels)})
    return [c for c in present if c < len(class_names)][:max(1, max_classes)]


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _limits(arrays: Sequence[np.ndarray], pad: float = 0.05) -> tuple[float, float]:
    values = np.concatenate([_finite(a) for a in arrays]) if arrays else np.zeros(0)
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span


def _tint(colour: str, amount: float = 0.7) -> tuple[float, float, float]:
    """The colour mixed with white (box fills light enough for the hatching and medians to show)."""
    rgb = np.asarray(mcolors.to_rgb(colour))
    return tuple(rgb + (1.0 - rgb) * amount)


# -- compression trade-offs -------------------------------------------------------------------------

@dataclass(frozen=True)
class TradeoffPoint:
    """One compressed model: its serialized size, MACs per image, accuracy, and a short label (e.g. the ratio)."""

    size_bytes: float
    macs: float
    accuracy: float  # share in [0, 1]
    label: str = ""


def accuracy_tradeoff(series: Mapping[str, Sequence[TradeoffPoint]], *, title: str = "") -> Figure:
    """Accuracy against model size (left) and against MACs per image (right), one series per
    technique (a line through its ratios, each point labelled), as in the accuracy/size/MACs
    columns of model-compression studies (e.g. Francy & Singh, "Edge AI: Evaluation of Model
    Compression Techniques for Convolutional Neural Networks", 2024, Tables 2-5)."""
    fig, axes = new_figure(11.0, 4.4, ncols=2)
    for i, (name, points) in enumerate(series.items()):
        points = sorted(points, key=lambda p: (p.size_bytes, p.macs))
        style = series_style(i)
        for ax, x in ((axes[0], [p.size_bytes / 1024 for p in points]), (axes[1], [p.macs / 1e6 for p in points])):
            y = [100.0 * p.accuracy for p in points]
            ax.plot(x, y, label=name, markersize=6, linewidth=1.3, **style)
            for k, (xi, yi, p) in enumerate(zip(x, y, points)):
                if p.label:  # alternate sides: points of one series may share a place (unstructured sizes)
                    ax.annotate(p.label, (xi, yi), textcoords="offset points", xytext=(5, 4 if k % 2 else -10),
                                fontsize="x-small", color=style["color"])
    axes[0].set_xlabel("serialized model size (KiB)")
    axes[1].set_xlabel("multiply-accumulates per image (millions)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.margins(x=0.1, y=0.08)  # room for the point labels
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[0].set_title("accuracy vs size", fontsize="medium")
    axes[1].set_title("accuracy vs compute", fontsize="medium")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- activation maps and regions (XDELTA, Wang and Nirjon, Figures 7-9) -------------------------------

@dataclass(frozen=True)
class MapExample:
    """One explained sample: the input (HWC uint8), two activation maps (HW, >= 0) and their
    thresholded regions (HW bool), and a caption (e.g. index, true class, prediction, scores)."""

    image: np.ndarray
    edge_map: np.ndarray
    delta_map: np.ndarray
    edge_region: np.ndarray
    delta_region: np.ndarray
    caption: str = ""


MAP_CMAP = "magma"  # perceptually uniform with monotonic lightness: a greyscale print keeps the ordering
EDGE_LINE = {"color": COLOURS[5], "linestyles": "solid", "linewidths": 1.6}
DELTA_LINE = {"color": COLOURS[4], "linestyles": "dashed", "linewidths": 1.6}


def map_examples(examples: Sequence[MapExample], *, title: str = "", edge_name: str = "edge",
                 delta_name: str = "DELTA") -> Figure:
    """One row per sample: the input; the edge model's GradCAM++ map with its region outlined
    (solid); the DELTA's map with its region (dashed); both regions on the input, tinted inside
    (XDELTA's overlays, Figures 7-9). Each map is shown as a share of its own maximum (the scale the
    regions are thresholded on)."""
    rows = max(1, len(examples))
    fig, axes = new_figure(7.4, 1.55 * rows + 0.9, ncols=4, nrows=rows, squeeze=False, layout="constrained")
    heat = None
    for r, ex in enumerate(examples):
        ax_in, ax_edge, ax_delta, ax_both = axes[r]
        ax_in.imshow(ex.image, interpolation="nearest")
        heat = ax_edge.imshow(_unit(ex.edge_map), cmap=MAP_CMAP, vmin=0, vmax=1, interpolation="nearest")
        _outline(ax_edge, ex.edge_region, EDGE_LINE)
        ax_delta.imshow(_unit(ex.delta_map), cmap=MAP_CMAP, vmin=0, vmax=1, interpolation="nearest")
        _outline(ax_delta, ex.delta_region, DELTA_LINE)
        ax_both.imshow(ex.image, interpolation="nearest")
        _outline(ax_both, ex.edge_region, EDGE_LINE, fill=0.3)
        _outline(ax_both, ex.delta_region, DELTA_LINE, fill=0.3)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        ax_in.set_ylabel(ex.caption, fontsize="x-small", rotation=0, ha="right", va="center", labelpad=4)
    for ax in axes[len(examples):].ravel():
        ax.set_visible(False)
    for ax, name in zip(axes[0], ("input", f"{edge_name} GradCAM++", f"{delta_name} GradCAM++", "regions")):
        ax.set_title(name, fontsize="small")
    size = examples[0].image.shape[:2] if examples else (0, 0)
    for ax in axes[len(examples) - 1] if examples else ():
        ax.set_xlabel(f"{size[1]} x {size[0]} pixels", fontsize="x-small")
    if heat is not None:
        bar = fig.colorbar(heat, ax=axes[:, 1:3], location="bottom", shrink=0.6, aspect=30, pad=0.01)
        bar.set_label("activation (share of the map's maximum)", fontsize="x-small")
        bar.ax.tick_params(labelsize="x-small")
    handles = [plt.Line2D([], [], color=EDGE_LINE["color"], linestyle="-", label=f"{edge_name} region"),
               plt.Line2D([], [], color=DELTA_LINE["color"], linestyle="--", label=f"{delta_name} region")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def _unit(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = values.max() if values.size else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def _outline(ax, region: np.ndarray, line: Mapping, fill: float = 0.0) -> None:
    """The region's boundary drawn along pixel edges (a dark halo keeps it visible on any background),
    and with ``fill`` > 0 its inside tinted with that opacity (which side is the region)."""
    import matplotlib.patheffects as effects

    region = np.asarray(region, dtype=bool)
    if not region.any():
        return
    h, w = region.shape
    # upsample 4x so the contour follows pixel edges instead of cutting pixel corners
    fine = np.kron(region.astype(np.float32), np.ones((4, 4), dtype=np.float32))
    xs = (np.arange(4 * w) + 0.5) / 4 - 0.5
    ys = (np.arange(4 * h) + 0.5) / 4 - 0.5
    if fill > 0:
        ax.contourf(xs, ys, fine, levels=[0.5, 1.5], colors=[line["color"]], alpha=fill)
    contour = ax.contour(xs, ys, fine, levels=[0.5], colors=[line["color"]], linestyles=line["linestyles"],
                         linewidths=line["linewidths"])
    contour.set_path_effects([effects.Stroke(linewidth=line["linewidths"] + 1.4, foreground="black"), effects.Normal()])
