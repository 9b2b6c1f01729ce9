"""Vectorized clients (``fl/vectorized.py``) against the sequential trainer, per round of K clients.

The engine-overhead workload (synthetic data, 50 samples per client, ``cnn_small``, 1 local epoch,
batch 32, lr 0.05, no momentum) for K clients per round, trained from the same received weights
either one after another with ``fl.local_training.train_dense`` or as one vmap with
``fl.vectorized.train_dense_vectorized``; both on ``--threads`` torch threads (default: all cores)
in this one process, rounds interleaved (sequential, vectorized, sequential, ...). Prints seconds
per round (median over rounds after the first) and the ratio vectorized / sequential, plus the
largest weight difference between the two relative to the weight scale.

    python bench/vectorized.py                       # K = 10 and 80, 4 rounds each

Measured on the 2-core CPU (``python bench/vectorized.py --rounds 3``, torch threads 2): K=10
0.310 s sequential, 0.497 s vectorized (1.60x); K=80 3.457 s, 6.218 s (1.80x): the CPU default of
``engine.batch_clients`` stays 0. Weights differed by up to 3.4e-5 (absolute, weight scale below
1): the synthetic images have flat regions, so max-pool windows hold exact ties, and the batched
(grouped) convolution rounds differently enough to break some ties the other way, which sends that
step's gradient to another, equally valid input position; with 1e-2 noise added to the images the
difference was 1.5e-8.
    python bench/vectorized.py --sizes 80 --rounds 6 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl.local_training import ClientData, TrainHyper, train_dense  # noqa: E402
from fl.sampling import seed_for  # noqa: E402
from fl.specs import DataSpec, ModelSpec, freeze  # noqa: E402
from fl.vectorized import train_dense_vectorized  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 80])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--samples-per-client", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hyper = TrainHyper(epochs=1, batch_size=32, lr=0.05, momentum=0.0)  # engine_overhead.WORKLOAD
    print(f"cnn_small, {args.samples_per_client} samples/client, epochs={hyper.epochs}, batch={hyper.batch_size}, "
          f"torch threads={args.threads}, rounds={args.rounds} (median of rounds 2..R)")
    print(f"{'K':>4} {'sequential s/round':>19} {'vectorized s/round':>19} {'x sequential':>13} {'max |dw|/scale':>15}")
    for k in args.sizes:
        data = DataSpec(name="synthetic", num_clients=k, seed=0, partition=freeze({"name": "iid"}),
                        options=freeze({"samples_per_client": args.samples_per_client}))
        federation = data.federation()
        torch.manual_seed(0)
        model = ModelSpec("cnn_small").build_for(federation)
        received = {name: t.clone() for name, t in model.state_dict().items()}
        clients = [ClientData(federation.train, federation.client_indices[p]) for p in range(k)]
        seq_times, vec_times, worst = [], [], 0.0
        for server_round in range(1, args.rounds + 1):
            gens = lambda: [torch.Generator().manual_seed(seed_for(0, server_round, p)) for p in range(k)]  # noqa: E731
            started = time.perf_counter()
            sequential = []
            for data_k, g in zip(clients, gens()):
                model.load_state_dict(received)
                train_dense(model, data_k, hyper, g)
                sequential.append({name: t.clone() for name, t in model.state_dict().items()})
            seq_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            states, _ = train_dense_vectorized(model, received, clients, hyper, gens())
            vec_times.append(time.perf_counter() - started)
            for s, v in zip(sequential, states):
                for name, t in s.items():
                    worst = max(worst, float((v[name] - t).abs().max()) / max(float(t.abs().max()), 1.0))
        seq, vec = statistics.median(seq_times[1:] or seq_times), statistics.median(vec_times[1:] or vec_times)
        print(f"{k:>4} {seq:>19.3f} {vec:>19.3f} {vec / seq:>13.2f} {worst:>15.2e}", flush=True)


if __name__ == "__main__":
    main()
