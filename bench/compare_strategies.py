"""Accuracy against communication for the finished runs of a sweep, printed as Markdown tables.

    python bench/compare_strategies.py multirun/<date>_<time> [--levels 0.5,0.6,0.7] [--reference fedavg_base]

The tables are fl.compare's (the one home of this arithmetic; ``python -m fl.compare --from <sweep>``
also draws the charts and writes them next to the runs): per run its round-0, final and best central
accuracy, cumulative uploaded and total MiB, and the MiB it needed to first reach each level, where
round 0 counts (a run that starts at or above a level needed 0 MiB). ``--reference <run>`` adds that
run's final accuracy as one more level; the run is named by its label (its arm, e.g. ``fedavg_base``,
or the override that tells it apart, e.g. ``strategy=fedavg``), exactly, so that an edge and a base
FedAvg arm can never be confused. Reads only the runs' logs; it measures nothing itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl.compare.runs import find_runs, load_runs
from fl.compare.table import arm_stats, markdown_tables
from fl.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--levels", default="", help="comma-separated accuracies, e.g. 0.5,0.6,0.7")
    parser.add_argument("--reference", default="", help="a run's label: its final accuracy becomes one more level")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(find_runs(args.sweep_dir))
        levels = [float(v) for v in args.levels.split(",") if v.strip()]
        if args.reference:
            matches = [run for run in runs if run.label == args.reference]
            if not matches:
                raise ConfigError("--reference", f"no run labelled {args.reference!r}; the runs are "
                                                 f"{', '.join(run.label for run in runs)}")
            final = arm_stats(matches[0], []).final_accuracy
            print(f"reference: {args.reference}'s final accuracy {final:.4f}")
            levels.append(final)
    except ValueError as err:  # ConfigError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    levels = sorted(set(levels))
    print(markdown_tables([arm_stats(run, levels) for run in runs], levels), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
