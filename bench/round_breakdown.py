"""Where a round of the ``inprocess`` engine goes: the clients' training, their reply encoding, the
server's screening and aggregation, against the round's wall time.

One FedAvg run of the engine-overhead workload (``engine_overhead.WORKLOAD``: ``cnn_small``, 1 local
epoch, batch 32, lr 0.05; N clients, 80% a round) in this process, with a timer around each stage; prints, per stage, the
median over rounds 2..R-1 of its seconds per round and per client. Stages on the worker threads are
summed over them and include waits for the other thread's Python (the GIL), so with two workers
they can add up to twice the wall time. Fewer samples per client (``--samples-per-client 4``) make a client's training about as short on 2 CPU cores as a
50-sample client's on one GPU (about 6 ms), which shows the engine's fixed per-client costs.

    python bench/round_breakdown.py
    python bench/round_breakdown.py --samples-per-client 4 --out docs/results/round_breakdown.txt
    python bench/round_breakdown.py --compute cuda --batch-clients 80
    python bench/round_breakdown.py --samples-per-client 4 --without-prescreen   # the server screens after the round

The timers wrap the functions the engine calls (``clients.fedavg_trainer``, ``clients.batched``,
``strategies.base.FederatedStrategy``); this script is a measurement, not a way to run the
simulator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from engine_overhead import WORKLOAD  # bench/, beside this script
from report import add_out_option, recorded

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import clients.batched as batched  # noqa: E402
import clients.fedavg_trainer as fedavg_trainer  # noqa: E402
import fl.server as server  # noqa: E402
import strategies.base as base  # noqa: E402
from fl.config import build  # noqa: E402
from fl.execute import execute  # noqa: E402
from tests.helpers import compose_config  # noqa: E402

STAGES = {  # label: (owner, attribute)
    "client training": [(fedavg_trainer, "train_dense"), (batched, "train_dense_vectorized")],
    "client reply encoding": [(fedavg_trainer, "encode_reply"), (batched, "encode_reply")],
    "screening on the workers": [(base.FederatedStrategy, "prescreen")],
    "server screening after the round": [(base.FederatedStrategy, "screen")],
    "server screening + aggregation": [(base.FederatedStrategy, "aggregate_train")],
}


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()
        self.rounds: list[tuple[float, dict[str, float]]] = []

    def wrap(self, owner, attribute: str, label: str) -> None:
        inner = getattr(owner, attribute)
        if inner is None:  # switched off (--without-prescreen)
            return

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[label] += time.perf_counter() - started

        setattr(owner, attribute, timed)

    def mark_rounds(self) -> None:
        """A snapshot at every round's report (Flower's evaluate_fn, called once a round)."""
        report = server.RoundReporter.__call__

        def marked(reporter, flower_round, arrays):
            with self.lock:
                self.rounds.append((time.perf_counter(), dict(self.seconds)))
            return report(reporter, flower_round, arrays)

        server.RoundReporter.__call__ = marked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--samples-per-client", type=int, default=50)
    parser.add_argument("--compute", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--batch-clients", type=int, default=0, help="engine.batch_clients (0: one at a time)")
    parser.add_argument("--workers", type=int, default=2, help="engine.workers")
    parser.add_argument("--torch-threads", type=int, default=1, help="engine.torch_threads")
    parser.add_argument("--without-prescreen", action="store_true",
                        help="the server screens every reply after the round (no FederatedStrategy.prescreen)")
    add_out_option(parser)
    args = parser.parse_args()
    with recorded(args.out):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    if args.without_prescreen:
        base.FederatedStrategy.prescreen = None  # RunRounds then hands the replies to nothing
    timers = Timers()
    for label, places in STAGES.items():
        for owner, attribute in places:
            timers.wrap(owner, attribute, label)
    timers.mark_rounds()
    per_round = max(int(args.num_clients * 0.8), 2)
    cfg = compose_config(["engine=inprocess", f"engine.workers={args.workers}",
                          f"engine.torch_threads={args.torch_threads}", f"engine.batch_clients={args.batch_clients}",
                          f"num_clients={args.num_clients}", "fraction_fit=0.8", f"rounds={args.rounds}",
                          "eval_every=0", "progress=false", "tensorboard=false", *WORKLOAD,
                          f"data.samples_per_client={args.samples_per_client}", f"compute={args.compute}"])
    with tempfile.TemporaryDirectory() as tmp:
        server_spec, engine, faults = build(cfg, tmp)
        execute(server_spec, engine, faults=faults)
    marks = timers.rounds  # [round 0's report, ..., round R's]
    steady = [(later[0] - earlier[0], {k: later[1].get(k, 0.0) - earlier[1].get(k, 0.0) for k in STAGES})
              for earlier, later in zip(marks, marks[1:])][1:-1] or []
    if not steady:
        sys.exit("too few rounds to measure: use --rounds 4 or more")
    print(f"{args.num_clients} clients, {per_round} a round, {args.samples_per_client} samples each, "
          f"compute={args.compute}, workers={args.workers}, torch threads={args.torch_threads}, "
          f"batch_clients={args.batch_clients}, "
          f"{'screening after the round' if args.without_prescreen else 'screening on the workers'}; "
          f"median of rounds 2..{args.rounds - 1}")
    wall = statistics.median(w for w, _ in steady)
    print(f"{'round wall time':>32}: {wall:.3f} s per round, {wall / per_round * 1e3:.2f} ms per client")
    for label in STAGES:
        value = statistics.median(stages[label] for _, stages in steady)
        print(f"{label:>32}: {value:.3f} s per round, {value / per_round * 1e3:.2f} ms per client")


if __name__ == "__main__":
    main()
