"""Engine overhead: plain PyTorch loop vs the ``inprocess`` engine vs Flower's ``ray`` engine.

One invocation runs all three on the same workload (synthetic data, 50 samples per client,
``cnn_small`` = 545k parameters, 1 local epoch, batch 32) for each federation size, each in a
fresh process, and prints per-round time and peak memory as ratios to the plain loop measured
in the same invocation (this machine is shared and noisy: compare ratios, not seconds).

    python bench/engine_overhead.py                  # N = 10, 100, 1000 (about 6 minutes)
    python bench/engine_overhead.py --sizes 1000 --rounds 4 --skip-ray
    python bench/engine_overhead.py --sizes 100 1000 --skip-ray --repeats 3   # interleaved repeats
    python bench/engine_overhead.py --compute cuda --out gpu.txt              # on a GPU; keep the report
    python bench/engine_overhead.py --compute cuda --sizes 100 --batch-clients 80 --paper   # + vmap, + VGG preset
    python bench/engine_overhead.py --sizes --paper --rounds 3                # the VGG preset's table alone
    python bench/engine_overhead.py --sizes 100 --skip-ray --workers 2 4 8    # inprocess on 2, 4, 8 threads

With ``--repeats k`` every engine runs k times, interleaved with the plain loop (plain, inprocess,
ray, plain, ...), and each figure is the median over the k runs: on a shared machine one run's
per-round time moves by 10-20% from run to run.

``--workers`` sets ``engine.workers`` of the in-process rows; several values give one row each
(``inproc w4``): on a GPU, more threads keep kernels queued while one client waits for its reply's
copy to the host, as Ray's concurrent actors do.

``--batch-clients K`` adds a ``vectorized`` row: the ``inprocess`` engine with
``engine.batch_clients=K`` (``fl/vectorized.py``). ``--paper`` adds one more table, the round of
``sim=delta_paper`` (VGG16/VGG8 DELTA, 100 clients in four tiers, 80 a round) on synthetic
CIFAR-shaped data for ``inprocess`` (and ``vectorized``: each tier's clients as one vmap) against
Flower's ``ray`` engine, as ratios to ``ray``. Only the federated rounds are timed there: the
central pair and DELTA are built once before, with one epoch per central step (their architecture,
which sets a round's work, is the preset's).

``--compute`` is the simulator's ``compute`` key (``fl.compute``), given to the plain loop and to
both engines alike; on ``ray``, ``cuda`` also reserves ``--gpus-per-client`` of a GPU per client
(``ray.num_gpus_per_client``). ``--out`` keeps the printed table in a file (``bench/report.py``).

Per-round time: median over rounds 2..R-1 (round 1 warms caches; the last round evaluates).
Memory: peak PSS of the whole process tree (Ray's raylet, GCS and workers included), sampled
every 0.25 s; on a GPU also the peak GPU memory allocated by the process that trains (the plain
loop's, the in-process engine's; ``-`` for Ray, whose workers train). First train: seconds from the benchmark's launching the process (interpreter start-up
and imports included) to the first client's local training, the same clock for every engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from process_memory import tree_memory  # bench/, beside this script
from report import add_out_option, recorded

ROOT = Path(__file__).resolve().parents[1]
SIZES = {10: 1.0, 100: 0.8, 1000: 0.1}  # the workloads: N=10 all, N=100 80%, N=1000 100/round
# The workload, which bench/plain_loop.py runs with the same settings.
WORKLOAD = ["train.epochs=1", "train.batch_size=32", "train.lr=0.05", "train.momentum=0.0", "checkpoint_every=0",
            "data.partition.name=shards", "++data.partition.classes_per_client=3"]
# The paper-scale preset (sim=delta_paper) offline, with one epoch per central step of its construction.
PAPER = ["sim=delta_paper", "data=synthetic", "checkpoint_every=0", "model.pair.base_recipe.epochs=1",
         "model.pair.edge_recipe.epochs=1", "model.construction.extract.epochs=1",
         "model.construction.extract.finetune.epochs=0", "model.construction.train.epochs=1",
         "model.construction.kd=null"]


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run ``cmd``; return its launch time and the peak PSS of its process tree."""
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_memory(ps, "pss"))
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return launched, peak[0]


def plain(n: int, fraction: float, rounds: int, tmp: Path, env: dict[str, str], args: argparse.Namespace) -> dict:
    out = tmp / f"plain_{n}.json"
    launched, peak = run_measured([sys.executable, "bench/plain_loop.py", "--num-clients", str(n), "--fraction",
                            str(fraction), "--rounds", str(rounds), "--compute", args.compute, "--out", str(out)], env)
    result = json.loads(out.read_text())
    return {"round_s": statistics.median(result["round_seconds"][1:-1] or result["round_seconds"]),
            "peak_pss": peak, "first_train_s": result["first_train_unix"] - launched,
            "peak_gpu": result.get("peak_gpu_bytes")}


def engine_overrides(name: str, args: argparse.Namespace) -> list[str]:
    """``engine=...`` and its keys for one row: ``inprocess``, ``inproc wN`` (inprocess on N worker
    threads), ``vectorized`` (inprocess + vmap) or ``ray``."""
    workers = [f"engine.workers={args.workers[0]}"] if args.workers else []
    if name == "vectorized":
        return ["engine=inprocess", f"engine.batch_clients={args.batch_clients}", *workers]
    if name.startswith("inproc w"):
        return ["engine=inprocess", f"engine.workers={name.removeprefix('inproc w')}"]
    if name == "inprocess":
        return ["engine=inprocess", *workers]
    gpus = [f"ray.num_gpus_per_client={args.gpus_per_client}"] if name == "ray" and args.compute != "cpu" else []
    return [f"engine={name}", *gpus]


def engine(name: str, n: int, fraction: float, rounds: int, tmp: Path, env: dict[str, str],
           args: argparse.Namespace, workload: list[str] | None = None) -> dict:
    run_dir = tmp / f"{name}_{n}"
    workload = WORKLOAD if workload is None else workload
    launched, peak = run_measured([sys.executable, "-m", "fl.simulate", *engine_overrides(name, args),
                                   f"num_clients={n}", f"fraction_fit={fraction}", f"rounds={rounds}", "eval_every=0",
                                   "progress=false", *workload, f"compute={args.compute}", f"hydra.run.dir={run_dir}"],
                                  env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_s"] for r in rows]
    per_round = [b - a for a, b in zip(walls, walls[1:])]
    summary = json.loads((run_dir / "summary.json").read_text())
    first = summary.get("first_train_unix")
    return {"round_s": statistics.median(per_round[1:-1] or per_round), "peak_pss": peak,
            "first_train_s": None if first is None else first - launched, "peak_gpu": summary.get("peak_gpu_bytes")}


def median_run(runs: list[dict]) -> dict:
    firsts = [r["first_train_s"] for r in runs if r["first_train_s"] is not None]
    gpus = [r["peak_gpu"] for r in runs if r["peak_gpu"] is not None]
    return {"round_s": statistics.median(r["round_s"] for r in runs),
            "peak_pss": statistics.median(r["peak_pss"] for r in runs),
            "first_train_s": statistics.median(firsts) if firsts else None,
            "peak_gpu": statistics.median(gpus) if gpus else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES), choices=list(SIZES),
                        help="federation sizes of the cnn_small table (none: only --paper's table)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per engine; medians are reported")
    parser.add_argument("--compute", default="cpu", help="cpu (default), cuda, cuda:N or auto: where every engine trains")
    parser.add_argument("--gpus-per-client", type=float, default=0.1,
                        help="with --compute other than cpu: the GPU share Ray reserves per client (default 0.1)")
    parser.add_argument("--batch-clients", type=int, default=0,
                        help="K > 0 adds a 'vectorized' row: inprocess with engine.batch_clients=K")
    parser.add_argument("--workers", type=int, nargs="*", default=[],
                        help="engine.workers of the inprocess rows (default: the config's); several values give "
                             "one row each, 'inproc wN' (the vectorized row takes the first)")
    parser.add_argument("--paper", action="store_true",
                        help="also time the rounds of sim=delta_paper (synthetic data): inprocess against ray")
    add_out_option(parser)
    args = parser.parse_args()
    if args.batch_clients < 0:
        parser.error(f"--batch-clients must be 0 (off) or a positive number of clients, not {args.batch_clients}")
    if any(n < 1 for n in args.workers):
        parser.error(f"--workers takes positive numbers of worker threads, not {args.workers}")
    with recorded(args.out):
        measure(args)


def print_row(n: int, name: str, r: dict, base: dict, gpu: bool) -> None:
    first = "-" if r["first_train_s"] is None else f"{r['first_train_s']:.2f}"
    on_gpu = "-" if r["peak_gpu"] is None else f"{r['peak_gpu'] / 2**20:.0f}"
    print(f"{n:>5} {name:>10} {r['round_s']:>8.3f} {r['round_s'] / base['round_s']:>8.2f} "
          f"{r['peak_pss'] / 2**20:>9.0f} {r['peak_pss'] / base['peak_pss']:>8.2f} {first:>14}"
          + (f" {on_gpu:>13}" if gpu else ""), flush=True)


def header(base_name: str, gpu: bool) -> None:
    print(f"{'N':>5} {'engine':>10} {'s/round':>8} {'x ' + base_name:>8} {'peak MiB':>9} {'x ' + base_name:>8} "
          f"{'first train s':>14}" + (f" {'peak GPU MiB':>13}" if gpu else ""))


def engines(args: argparse.Namespace, ray: bool) -> tuple[str, ...]:
    inprocess = tuple(f"inproc w{n}" for n in args.workers) if len(args.workers) > 1 else ("inprocess",)
    names = (*inprocess, "vectorized") if args.batch_clients else inprocess
    return (*names, "ray") if ray else names


def measure(args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"compute={args.compute}, {args.rounds} rounds; median per-round time and peak PSS of each engine")
    gpu = args.compute != "cpu"
    if args.sizes:
        header("plain", gpu)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for n in args.sizes:
            fraction = SIZES[n]
            runs: dict[str, list[dict]] = {}
            for _ in range(max(args.repeats, 1)):
                runs.setdefault("plain", []).append(plain(n, fraction, args.rounds, tmp, env, args))
                for name in engines(args, ray=not args.skip_ray):
                    runs.setdefault(name, []).append(engine(name, n, fraction, args.rounds, tmp, env, args))
            results = {name: median_run(rs) for name, rs in runs.items()}
            for name, r in results.items():
                print_row(n, name, r, results["plain"], gpu)
        if args.paper:
            paper(args, tmp, env, gpu)


def paper(args: argparse.Namespace, tmp: Path, env: dict[str, str], gpu: bool) -> None:
    """The rounds of ``sim=delta_paper`` on synthetic data, each engine against ``ray``."""
    workload = [*PAPER, f"model.cache_dir={tmp / 'paper_cache'}", f"compute={args.compute}"]
    started = time.time()
    built = subprocess.run([sys.executable, "-m", "fl.delta.pretrain", *workload], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit(f"building the paper preset's DELTA failed:\n{built.stdout[-2000:]}{built.stderr[-2000:]}")
    print(f"(sim=delta_paper: base, edge and DELTA built in {time.time() - started:.0f} s)", flush=True)
    results = {}
    for name in engines(args, ray=True):
        started = time.time()
        results[name] = median_run([engine(name, 100, 0.8, args.rounds, tmp / "paper", env, args, workload)
                                    for _ in range(max(args.repeats, 1))])
        print(f"(sim=delta_paper on {name}: {time.time() - started:.0f} s)", flush=True)
    print(f"\nsim=delta_paper (VGG16 base, VGG8 edge, 100 clients, 80 a round), synthetic data, {args.rounds} rounds")
    header("ray", gpu)
    for name, r in results.items():
        print_row(100, name, r, results["ray"], gpu)


if __name__ == "__main__":
    main()
