"""Accuracy against communication for the runs of a sweep (e.g. ``-m sim=compare_sparse``).

    python bench/compare_strategies.py multirun/<date>_<time> [--reference fedavg]

For every run: final and best central accuracy, cumulative uploaded and total bytes, and the
bytes (upload, and upload + download) it needed to first reach the reference run's final accuracy,
or "not reached" with the best it reached. Reads only the run directories' metrics.jsonl and
config.yaml, so it measures nothing itself: the figures are those the runs logged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def load(run_dir: Path) -> tuple[str, list[dict]]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    name = config["strategy"]["_target_"].rsplit(".", 1)[-1]
    model = config["model"]["name"] + (f"/{config['model']['role']}" if config["model"].get("role") else "")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return f"{name} ({model})", rows


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--reference", default="FedAvg", help="strategy class whose final accuracy is the target")
    parser.add_argument("--levels", default="", help="comma-separated accuracies, e.g. 0.5,0.6,0.7: a second "
                                                     "table of the total MiB each run needed to first reach each")
    args = parser.parse_args()
    runs = [load(d) for d in sorted(p for p in args.sweep_dir.iterdir() if (p / "metrics.jsonl").exists())]
    reference = next(rows for name, rows in runs if name.lower().startswith(args.reference.lower()))
    target = [r for r in reference if r["accuracy"] is not None][-1]["accuracy"]
    print(f"target: {args.reference}'s final accuracy {target:.4f}")
    print("| run | final acc | best acc | up MiB | total MiB | up MiB to target | total MiB to target |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in runs:
        evaluated = [r for r in rows if r["accuracy"] is not None]
        last = rows[-1]
        hit = next((r for r in evaluated if r["round"] > 0 and r["accuracy"] >= target), None)
        reach = (f"{mib(hit['cum_up_bytes'])} (round {hit['round']})", mib(hit["cum_up_bytes"] + hit["cum_down_bytes"])) \
            if hit else (f"not reached (best {max(r['accuracy'] for r in evaluated):.4f})", "-")
        print(f"| {name} | {evaluated[-1]['accuracy']:.4f} | {max(r['accuracy'] for r in evaluated):.4f} | "
              f"{mib(last['cum_up_bytes'])} | {mib(last['cum_up_bytes'] + last['cum_down_bytes'])} | {reach[0]} | {reach[1]} |")
    levels = [float(v) for v in args.levels.split(",") if v.strip()]
    if levels:
        print()
        print("| run | " + " | ".join(f"total MiB to {100 * v:g}%" for v in levels) + " |")
        print("|---|" + "---:|" * len(levels))
        for name, rows in runs:
            cells = []
            for level in levels:
                hit = next((r for r in rows if r["accuracy"] is not None and r["accuracy"] >= level), None)
                cells.append(f"{mib(hit['cum_up_bytes'] + hit['cum_down_bytes'])} (round {hit['round']})"
                             if hit else "not reached")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
