"""Vectorized clients (``fl/vectorized.py``) against the sequential trainer, per round of K clients.

The engine-overhead workload (synthetic data, 50 samples per client, ``cnn_small``, 1 local epoch,
batch 32, lr 0.05, no momentum) for K clients per round, trained from the same received weights
either one after another with ``fl.local_training.train_dense`` or as one vmap with
``fl.vectorized.train_dense_vectorized``; both on ``--threads`` torch threads (default: all cores)
in this one process, rounds interleaved (sequential, vectorized, sequential, ...). Prints seconds
per round (median over rounds after the first) and the ratio vectorized / sequential, plus the
largest weight difference between the two relative to the weight scale.

    python bench/vectorized.py                       # K = 10 and 80, 4 rounds each
    python bench/vectorized.py --sizes 80 --rounds 6 --compute cuda     # on a GPU
    python bench/vectorized.py --rounds 3 --out docs/results/vectorized.txt
    python bench/vectorized.py --sizes --profile 20 --out docs/results/vectorized_profile.txt

The figures measured on the 2-core CPU, and why ``engine.batch_clients`` defaults to 0 there, are
in docs/engines.md (from ``docs/results/vectorized.txt``). Weights differ by up to a few 1e-5
relative: the synthetic images have flat regions, so max-pool windows hold exact ties, and the
batched (grouped) convolution rounds differently enough to break some ties the other way, which
sends that step's gradient to another, equally valid input position.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from report import add_out_option, recorded  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl.compute import resolve_compute  # noqa: E402
from fl.local_training import ClientData, TrainHyper, train_dense  # noqa: E402
from fl.sampling import seed_for  # noqa: E402
from fl.specs import DataSpec, ModelSpec, freeze  # noqa: E402
from fl.vectorized import train_dense_vectorized  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 80])
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="also profile one vectorized round of K clients (torch.profiler): its top operators")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--samples-per-client", type=int, default=50)
    parser.add_argument("--compute", default="cpu", help="cpu (default), cuda, cuda:N or auto (fl.compute)")
    add_out_option(parser)
    args = parser.parse_args()
    with recorded(args.out):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = resolve_compute(args.compute)
    hyper = TrainHyper(epochs=1, batch_size=32, lr=0.05, momentum=0.0)  # engine_overhead.WORKLOAD
    print(f"cnn_small, {args.samples_per_client} samples/client, epochs={hyper.epochs}, batch={hyper.batch_size}, "
          f"compute={device}, torch threads={args.threads}, rounds={args.rounds} (median of rounds 2..R)")
    if args.sizes:
        print(f"{'K':>4} {'sequential s/round':>19} {'vectorized s/round':>19} {'x sequential':>13} {'max |dw|/scale':>15}")
    for k in args.sizes:
        model, received, clients = workload(k, args.samples_per_client, device)
        seq_times, vec_times, worst = [], [], 0.0
        for server_round in range(1, args.rounds + 1):
            gens = lambda: [torch.Generator().manual_seed(seed_for(0, server_round, p)) for p in range(k)]  # noqa: E731
            synchronize(device)
            started = time.perf_counter()
            sequential = []
            for data_k, g in zip(clients, gens()):
                model.load_state_dict(received)
                train_dense(model, data_k, hyper, g)
                sequential.append({name: t.clone() for name, t in model.state_dict().items()})
            synchronize(device)
            seq_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            states, _ = train_dense_vectorized(model, received, clients, hyper, gens())
            synchronize(device)
            vec_times.append(time.perf_counter() - started)
            for s, v in zip(sequential, states):
                for name, t in s.items():
                    worst = max(worst, float((v[name] - t).abs().max()) / max(float(t.abs().max()), 1.0))
        seq, vec = statistics.median(seq_times[1:] or seq_times), statistics.median(vec_times[1:] or vec_times)
        print(f"{k:>4} {seq:>19.3f} {vec:>19.3f} {vec / seq:>13.2f} {worst:>15.2e}", flush=True)
    if args.profile:
        profile(args.profile, args, device, hyper)


def workload(k: int, samples_per_client: int, device: torch.device):
    """K synthetic clients' data, a ``cnn_small`` on ``device`` and the weights they all receive."""
    data = DataSpec(name="synthetic", num_clients=k, seed=0, partition=freeze({"name": "iid"}),
                    options=freeze({"samples_per_client": samples_per_client}))
    federation = data.federation()
    torch.manual_seed(0)
    model = ModelSpec("cnn_small").build_for(federation).to(device)
    received = {name: t.clone() for name, t in model.state_dict().items()}
    return model, received, [ClientData(federation.train, federation.client_indices[p]) for p in range(k)]


def profile(k: int, args: argparse.Namespace, device: torch.device, hyper: TrainHyper) -> None:
    """The operators that take most of one vectorized round of ``k`` clients (after a warm-up round)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiled

    model, received, clients = workload(k, args.samples_per_client, device)
    generators = lambda: [torch.Generator().manual_seed(p) for p in range(k)]  # noqa: E731
    train_dense_vectorized(model, received, clients, hyper, generators())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiled(activities=activities) as prof:
        train_dense_vectorized(model, received, clients, hyper, generators())
        synchronize(device)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\none vectorized round of K={k} clients under torch.profiler: aten operators by self CPU time")
    for event in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]:
        print(f"{event.key:>32}: {100 * event.self_cpu_time_total / total:5.1f}% of the CPU time")


if __name__ == "__main__":
    main()
