"""Scale: registered clients against time per round and peak memory, 100 clients sampled per round.

Each size runs ``python -m fl.simulate`` in a fresh process with the default configuration except
the workload below (FedAvg on the synthetic set, 50 samples per client, iid, the in-process engine,
central evaluation every round, a checkpoint after the last round): ``cnn_small`` shrunk to 10,226
parameters (``width=0.25``, ``hidden=8``), 3 rounds, 100 of N clients per round. No environment
variable is set.

    python bench/scale.py                          # N = 10k, 100k, 1M (about 3 minutes on 2 cores)
    python bench/scale.py --sizes 10000 --json scale.json
    python bench/scale.py --tree /tmp/old --max-gib 8   # the same workload on another checkout
    python bench/scale.py --repeats 3              # each size three times, medians reported

On a shared machine one run's time per round moves by a factor of up to two with the load;
``--repeats k`` runs the sizes k times in turn (10k, 100k, 1M, 10k, ...) and reports medians.

s/round: the median of the three rounds' wall times (``metrics.jsonl``); setup s: from launch to the
run's start (imports, building the federation, the model); peak GiB: ``ru_maxrss`` of the run's
process and its children (``os.wait4``). ``--max-gib`` stops a run whose resident memory passes the
limit (sampled every 0.2 s), which is then reported as "> limit, stopped after s".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from process_memory import tree_memory  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]
SIZES = (10_000, 100_000, 1_000_000)
PER_ROUND = 100
ROUNDS = 3
# The tiny model of the issue ("a 10k-parameter model"): 10,226 parameters on 32x32x3, 10 classes.
WORKLOAD = ["++model.width=0.25", "++model.hidden=8", "progress=false"]


def run_size(n: int, tree: Path, work: Path, max_gib: float | None) -> dict:
    """One run of ``n`` registered clients in ``work``; its per-round times, setup time and peak memory."""
    work.mkdir(parents=True)
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "fl.simulate", f"num_clients={n}", f"fraction_fit={PER_ROUND / n}",
           f"min_fit_clients={PER_ROUND}", f"rounds={ROUNDS}", *WORKLOAD, f"hydra.run.dir={run_dir}"]
    log_path = work / "output.log"
    launched = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    stopped = False
    while True:  # poll without reaping, so that wait4 below gets the child's rusage
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            sys.exit(f"lost the benchmark process of N={n}")
        if pid:
            break
        if max_gib is not None and not stopped and tree_memory(ps, "rss") > max_gib * 2**30:
            stopped = True
            for child in ps.children(recursive=True):
                child.kill()
            proc.kill()
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.time() - launched
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    if stopped:
        return {"num_clients": n, "stopped": True, "stopped_after_s": elapsed, "peak_gib": peak / 2**30,
                "round_s": None, "setup_s": None, "total_s": elapsed}
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({proc.returncode}): {' '.join(cmd)}\n{log_path.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_s"] for r in rows]
    rounds = [b - a for a, b in zip(walls, walls[1:])]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"num_clients": n, "stopped": False, "round_s": statistics.median(rounds), "rounds_s": rounds,
            "setup_s": elapsed - summary["wall_s"], "total_s": elapsed, "peak_gib": peak / 2**30,
            "final_accuracy": summary["final_accuracy"]}


def _row(r: dict, max_gib: float | None) -> str:
    if r["stopped"]:
        return f"{'-':>8} {'-':>8} {'-':>8} {'>' + format(max_gib, 'g'):>9}  (stopped after {r['stopped_after_s']:.0f} s)"
    return f"{r['round_s']:>8.2f} {r['setup_s']:>8.1f} {r['total_s']:>8.1f} {r['peak_gib']:>9.2f}"


def median_run(runs: list[dict]) -> dict:
    """The median of each figure over repeated runs of one size (a stopped run stays stopped)."""
    if any(r["stopped"] for r in runs):
        return next(r for r in runs if r["stopped"])
    out = dict(runs[-1], repeats=len(runs))
    for key in ("round_s", "setup_s", "total_s", "peak_gib"):
        out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="registered clients per run")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to run (default: this one)")
    parser.add_argument("--max-gib", type=float, default=None, help="stop a run whose memory passes this")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size, in turn; medians are reported")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    print(f"{PER_ROUND} clients per round, {ROUNDS} rounds, cnn_small width 0.25 hidden 8 (10,226 params), "
          f"checkout {args.tree}")
    print(f"{'N':>9} {'s/round':>8} {'setup s':>8} {'total s':>8} {'peak GiB':>9}")
    runs: dict[int, list[dict]] = {n: [] for n in args.sizes}
    with tempfile.TemporaryDirectory() as tmp_name:
        for repeat in range(max(args.repeats, 1)):
            for n in args.sizes:
                if runs[n] and runs[n][-1]["stopped"]:  # a size that passed --max-gib is not run again
                    continue
                run_dir = Path(tmp_name) / f"{n}_{repeat}"
                runs[n].append(run_size(n, args.tree.resolve(), run_dir, args.max_gib))
                if args.repeats > 1:
                    print(f"  run {repeat + 1} of N={n}: {_row(runs[n][-1], args.max_gib)}", file=sys.stderr, flush=True)
    results = [median_run(runs[n]) for n in args.sizes]
    for r in results:
        print(f"{r['num_clients']:>9} {_row(r, args.max_gib)}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"per_round": PER_ROUND, "rounds": ROUNDS, "tree": str(args.tree),
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
