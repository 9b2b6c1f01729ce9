"""What a comparison writes next to its runs: two PNG charts and a Markdown table.

``compare_up.png`` draws central test accuracy against cumulative uploaded MiB and
``compare_total.png`` against cumulative total (upload + download) MiB, one line per arm from its
round 0 (0 MiB) to its last round. ``compare.md`` holds the tables of ``fl.compare.table`` and the
charts. Earlier outputs are removed first and each file is written through a temporary file, so a
failed comparison never leaves a result that looks finished.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fl.compare.runs import Run
from fl.compare.table import DEFAULT_LEVELS, MIB, arm_stats, markdown_tables

UP_PNG = "compare_up.png"
TOTAL_PNG = "compare_total.png"
TABLE_MD = "compare.md"
OUTPUT_FILES = (UP_PNG, TOTAL_PNG, TABLE_MD)
AXES = {"up": ("cum_up_bytes",), "total": ("cum_up_bytes", "cum_down_bytes")}
XLABELS = {"up": "cumulative uploaded MiB (all clients)", "total": "cumulative MiB uploaded + downloaded (all clients)"}
YLABEL = "central test accuracy"
XSCALES = ("symlog", "linear")

Series = dict[str, tuple[list[float], list[float]]]


@dataclass(frozen=True)
class Comparison:
    """The written files and what was drawn in them: ``series[axis][label] = (MiB, accuracy)``."""

    files: dict[str, Path]
    series: dict[str, Series]
    table: str


def accuracy_series(runs: Sequence[Run], axis: str) -> Series:
    """One (cumulative MiB, accuracy) line per run over its evaluated rounds; ``axis`` is up or total."""
    keys = AXES[axis]
    return {run.label: ([sum(r[k] for k in keys) / MIB for r in run.evaluated], [r["accuracy"] for r in run.evaluated])
            for run in runs}


def symlog_threshold(series: Series) -> float:
    """The power of ten at or below the smallest positive x: the symlog axis is linear from 0 up to
    it (round 0 sits at 0 MiB) and logarithmic above, so arms whose traffic differs by orders of
    magnitude all stay readable."""
    positive = [x for xs, _ in series.values() for x in xs if x > 0]
    return 10.0 ** math.floor(math.log10(min(positive))) if positive else 1.0


def clear_outputs(out_dir: str | os.PathLike) -> None:
    """Remove an earlier comparison's files from ``out_dir`` (they would describe other runs)."""
    for name in OUTPUT_FILES:
        Path(out_dir, name).unlink(missing_ok=True)


def write_comparison(runs: Sequence[Run], out_dir: str | os.PathLike, *, levels: Sequence[float] = DEFAULT_LEVELS,
                     title: str = "", header: str = "", xscale: str = "symlog") -> Comparison:
    """Draw both charts and write the tables into ``out_dir``; returns the files and the drawn series.
    ``xscale``: ``symlog`` (linear up to ``symlog_threshold``, logarithmic above) or ``linear``."""
    from fl.figures import line_chart, save_png  # matplotlib loads only when something is drawn
    from fl.outputs import atomic_write_text

    out = Path(out_dir)
    clear_outputs(out)
    stats = [arm_stats(run, levels) for run in runs]
    table = markdown_tables(stats, levels)
    series = {axis: accuracy_series(runs, axis) for axis in AXES}
    files = {}
    for axis, name in (("up", UP_PNG), ("total", TOTAL_PNG)):
        xlabel = XLABELS[axis] + (", log scale above " + f"{symlog_threshold(series[axis]):g}" if xscale == "symlog" else "")
        fig = line_chart(series[axis], xlabel=xlabel, ylabel=YLABEL,
                         title=f"{title}accuracy against {'uploaded' if axis == 'up' else 'total'} MiB")
        if xscale == "symlog":
            top = max((x for xs, _ in series[axis].values() for x in xs), default=1.0)
            fig.axes[0].set_xscale("symlog", linthresh=symlog_threshold(series[axis]))
            fig.axes[0].set_xlim(0, max(top, 1.0) * 1.3)
            fig.tight_layout()
        files[axis] = Path(save_png(fig, out / name))
    text = (f"# Accuracy against communication\n\n{header}"
            f"{table}\n![accuracy against uploaded MiB]({UP_PNG})\n\n![accuracy against total MiB]({TOTAL_PNG})\n")
    atomic_write_text(out / TABLE_MD, text)  # last: its presence marks a complete comparison
    files["table"] = out / TABLE_MD
    return Comparison(files=files, series=series, table=table)
