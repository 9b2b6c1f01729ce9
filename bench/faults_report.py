"""Issue figure: a 100-client FedAvg run under a 20% crash rate and a 10% NaN-update rate against
the same run without faults (same seed, data, partition, initial model).

    python bench/faults_report.py            # 100 clients, 80 per round, 20 rounds (defaults)
    python bench/faults_report.py rounds=5   # any fl.simulate override, applied to both runs
    python bench/faults_report.py --out docs/results/faults.txt   # also keep the report (bench/report.py)
    python bench/faults_report.py --hostile data=mnist data.root=../shared/data num_clients=20 ...

Prints rounds completed, replies that failed, updates rejected, whether any aggregated update was
non-finite, and the final accuracy of both runs with their difference in points. With
``--hostile``: the clean run against a tenth of the clients hostile in every round
(``faults.hostile=0.1``), once sending weights of 3e38 (``huge``) and once claiming ``num-examples``
1e30 (``inflate``), with the updates the robust bounds refused.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from report import add_out_option, recorded  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl.run_logger import read_metrics  # noqa: E402
from tests.helpers import compose_config  # noqa: E402


def run(run_dir: Path, overrides: list[str]) -> tuple[dict, list[dict]]:
    from fl.config import build
    from fl.execute import execute

    server, engine, faults = build(compose_config(["progress=false"] + overrides), str(run_dir))
    return execute(server, engine, faults=faults), read_metrics(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extra", nargs="*", help="fl.simulate overrides for both runs, e.g. rounds=5")
    parser.add_argument("--hostile", action="store_true", help="hostile clients (huge weights, inflated counts)")
    add_out_option(parser)
    args = parser.parse_args()
    with recorded(args.out):
        (hostile if args.hostile else report)(args.extra)


def report(extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clean, clean_rows = run(Path(tmp) / "clean", extra)
        faulty, faulty_rows = run(Path(tmp) / "faulty", ["faults.crash=0.2", "faults.nan=0.1", *extra])
        state = torch.load(Path(tmp) / "faulty" / "final_model.pt")
    finite = all(torch.isfinite(v.float()).all() for v in state.values())
    rounds = [r for r in faulty_rows if r["round"] > 0]
    print(f"overrides: {' '.join(extra) or '(defaults)'}")
    print(f"fault-free: final accuracy {clean['final_accuracy']:.4f}")
    print(f"faulty:     final accuracy {faulty['final_accuracy']:.4f}; rounds completed {len(rounds)}; "
          f"failed replies {sum(r['failures'] for r in rounds)}; rejected updates {sum(r['rejected'] for r in rounds)}; "
          f"final model finite: {finite}")
    print(f"difference: {100 * (clean['final_accuracy'] - faulty['final_accuracy']):+.2f} points")


def hostile(extra: list[str]) -> None:
    print(f"overrides: {' '.join(extra) or '(defaults)'}")
    finals = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("clean", "huge", "inflate"):
            faults = [] if kind == "clean" else ["faults.hostile=0.1", f"faults.hostile_kind={kind}"]
            summary, rows = run(Path(tmp) / kind, [*faults, *extra])
            finals[kind] = summary["final_accuracy"]
            refused = [r["rejected"] for r in rows if r["round"] > 0]
            print(f"{kind:>8}: final accuracy {summary['final_accuracy']:.4f}; updates refused per round "
                  f"{' '.join(map(str, refused))}; difference to clean {100 * (finals[kind] - finals['clean']):+.2f} points")


if __name__ == "__main__":
    main()
