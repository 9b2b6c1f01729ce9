"""Start-up costs that land inside a run: importing torch, flwr and the simulator, and
``torch._dynamo``, which ``torch.optim``'s first optimizer imports (so inside round 1).

Each import is timed in a fresh interpreter (``--repeats`` times, the median printed), after the
imports before it in the list, as a run meets them.

    python bench/import_cost.py
    python bench/import_cost.py --out docs/results/import_cost.txt
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from report import add_out_option, recorded  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]
STEPS = [("torch", "import torch"), ("flwr", "import flwr.serverapp, flwr.clientapp"),
         ("fl.simulate", "import fl.simulate"), ("torch._dynamo (the first optimizer)", "import torch._dynamo")]


def seconds(before: list[str], statement: str) -> float:
    script = "; ".join([*before, "import time", "t = time.perf_counter()", statement,
                        "print(time.perf_counter() - t)"])
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    add_out_option(parser)
    args = parser.parse_args()
    with recorded(args.out):
        print(f"seconds per import in a fresh interpreter, median of {args.repeats}")
        for i, (name, statement) in enumerate(STEPS):
            before = [s for _, s in STEPS[:i]]
            times = [seconds(before, statement) for _ in range(args.repeats)]
            print(f"{name:>36}: {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
