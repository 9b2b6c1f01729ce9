"""Figures for people: one home for how the project draws (matplotlib, Agg backend) and encodes
images (Pillow), so that plugins, the comparison and the benchmarks draw alike.

Every figure carries axis labels with units and a legend; series are told apart by marker and
line style as well as colour (``series_style``), so a greyscale print still separates them.
A figure leaves this module either as a PNG file (``save_png``) or as an RGB array for
TensorBoard's image tab (``to_rgb``); both close it.
"""

from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on the machines this runs on; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
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
