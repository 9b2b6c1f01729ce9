"""The comparison's numbers per arm and their Markdown tables (the one home of this arithmetic).

For each run: the round-0 (pretrained or initial) accuracy, the final accuracy (last evaluated
round), the best accuracy and its round, the cumulative uploaded and total (upload + download)
bytes at the end, and for each accuracy level the cumulative bytes at the first evaluated round
whose accuracy reaches it. Round 0 counts: an arm that starts at or above a level needs 0 MiB; a
level never reached is ``None`` (shown as an em dash).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fl.compare.runs import Run

MIB = 2**20
DEFAULT_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)
NOT_REACHED = "\u2014"  # em dash


@dataclass(frozen=True)
class Reach:
    """Where an arm first reached an accuracy level: the round and the cumulative bytes by then."""

    round: int
    up_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class ArmStats:
    label: str
    rounds: int
    start_accuracy: float | None  # round 0; None when round 0 was not evaluated
    final_accuracy: float
    best_accuracy: float
    best_round: int
    up_bytes: int
    total_bytes: int
    reach: dict[float, Reach | None]


def arm_stats(run: Run, levels: Sequence[float] = DEFAULT_LEVELS) -> ArmStats:
    evaluated = run.evaluated
    last = run.rows[-1]
    best = max(evaluated, key=lambda r: r["accuracy"])  # the first round with the best accuracy
    start = next((r["accuracy"] for r in evaluated if r["round"] == 0), None)
    reach = {}
    for level in levels:
        hit = next((r for r in evaluated if r["accuracy"] >= level), None)
        reach[level] = None if hit is None else Reach(hit["round"], int(hit["cum_up_bytes"]),
                                                      int(hit["cum_up_bytes"] + hit["cum_down_bytes"]))
    return ArmStats(label=run.label, rounds=int(last["round"]), start_accuracy=start,
                    final_accuracy=evaluated[-1]["accuracy"], best_accuracy=best["accuracy"], best_round=best["round"],
                    up_bytes=int(last["cum_up_bytes"]), total_bytes=int(last["cum_up_bytes"] + last["cum_down_bytes"]),
                    reach=reach)


def mib(n_bytes: float) -> str:
    """Bytes as MiB with two decimals and thousands separators, e.g. ``1,288.03``."""
    return f"{n_bytes / MIB:,.2f}"


def accuracy(value: float | None) -> str:
    return NOT_REACHED if value is None else f"{value:.4f}"


def level_name(level: float) -> str:
    return f"{100 * level:.4g}%"


def cell(text: str) -> str:
    """Text for a Markdown table cell (a ``|`` would end the cell)."""
    return text.replace("|", "\\|")


def reach_cell(reach: Reach | None, total: bool) -> str:
    if reach is None:
        return NOT_REACHED
    return f"{mib(reach.total_bytes if total else reach.up_bytes)} (round {reach.round})"


def markdown_tables(stats: Sequence[ArmStats], levels: Sequence[float] = DEFAULT_LEVELS) -> str:
    """Three Markdown tables: accuracy and MiB per arm; uploaded MiB to each level; total MiB to it."""
    lines = ["| arm | rounds | start accuracy (round 0) | final accuracy | best accuracy (round) | uploaded MiB | "
             "total MiB (up + down) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in stats:
        lines.append(f"| {cell(s.label)} | {s.rounds} | {accuracy(s.start_accuracy)} | {accuracy(s.final_accuracy)} | "
                     f"{accuracy(s.best_accuracy)} ({s.best_round}) | {mib(s.up_bytes)} | {mib(s.total_bytes)} |")
    if levels:
        for total, what in ((False, "Uploaded"), (True, "Total (up + down)")):
            lines += ["", f"{what} MiB to first reach each accuracy (round 0 counts; {NOT_REACHED}: never reached):", "",
                      "| arm | " + " | ".join(f"to {level_name(v)}" for v in levels) + " |",
                      "|---|" + "---:|" * len(levels)]
            for s in stats:
                lines.append(f"| {cell(s.label)} | " + " | ".join(reach_cell(s.reach[v], total) for v in levels) + " |")
    return "\n".join(lines) + "\n"
