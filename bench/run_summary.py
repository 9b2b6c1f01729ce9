"""One ``python -m fl.simulate`` run and what the docs quote of it: central accuracy per round,
traffic, time, and the last round's client and plugin metrics.

    python bench/run_summary.py plugins=[agilenn]                 # any fl.simulate overrides
    python bench/run_summary.py plugins=[agilenn] --out docs/results/agilenn_federated_synthetic.txt
    python bench/run_summary.py sim=delta_100clients --cold --out docs/results/cold_start.txt

The run goes to a temporary directory (``hydra.run.dir``) in a fresh process; the report is read
from its ``metrics.jsonl`` and ``summary.json``. ``--out`` keeps the report (``bench/report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import add_out_option, recorded  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="fl.simulate overrides, e.g. plugins=[agilenn] rounds=5")
    parser.add_argument("--cold", action="store_true", help="start from an empty model cache (FL_DELTA_CACHE)")
    add_out_option(parser)
    args = parser.parse_args()
    with recorded(args.out):
        summarize(args.overrides, args.cold)


def summarize(overrides: list[str], cold: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FL_DELTA_CACHE": f"{tmp}/cache"} if cold else None
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fl.simulate", *overrides, "progress=false",
                               f"hydra.run.dir={tmp}/run"], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        steps = central_seconds(Path(tmp, "cache")) if cold else []
        if done.returncode != 0:
            sys.exit(f"the run failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        summary = json.loads(Path(tmp, "run", "summary.json").read_text())
    print(f"overrides: {' '.join(overrides) or '(defaults)'}")
    print(f"run: {seconds:.0f} s in all" + (", from an empty model cache" if cold else ""))
    for step, value in steps:
        print(f"central step {step}: {value:.1f} s")
    print("accuracy by round: " + " ".join(f"{r['round']}:{r['accuracy']:.4f}" for r in rows
                                            if r.get("accuracy") is not None))
    print(f"final accuracy {summary['final_accuracy']:.4f}, best {summary['best_accuracy']:.4f}; "
          f"up {summary['cum_up_bytes'] / 2**20:.1f} MiB, down {summary['cum_down_bytes'] / 2**20:.1f} MiB")
    last = rows[-1]
    for key in sorted(k for k in last if k.startswith("train/") and isinstance(last[k], (int, float))):
        print(f"last round {key}: {last[key]:.4f}")
    for key in sorted({k for r in rows for k in r if "plugin/" in k}):
        values = [f"{r['round']}:{r[key]:.4f}" for r in rows if isinstance(r.get(key), (int, float))]
        print(f"{key} by round: {' '.join(values)}")


def central_seconds(cache: Path) -> list[tuple[str, float]]:
    """(step, seconds) of every timing the cache's JSON reports hold (``seconds`` or ``*_s`` keys)."""
    found = []

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, (int, float)) and (key == "seconds" or key.endswith("_s")):
                    found.append((f"{path}{key}", float(value)))
                else:
                    walk(value, f"{path}{key}.")

    for report in sorted(cache.rglob("*.json")):
        walk(json.loads(report.read_text(encoding="utf-8")), f"{report.parent.name}/{report.stem}: ")
    return found


if __name__ == "__main__":
    main()
