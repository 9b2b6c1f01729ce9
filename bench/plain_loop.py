"""The baseline the engines are measured against: the same FedAvg training in a plain PyTorch loop.

Same data, partition, model, client sampling, local trainer and aggregation as
``python -m fl.simulate strategy=fedavg``, with none of Flower: for each sampled client, load the
global weights, train, keep a copy of the weights; then the sample-weighted mean. Like the engine
(with ``eval_every=0``) it evaluates the initial model (after round 1, when the engine does) and the
final one on the test set, so both do the same work. torch uses all cores for its intra-op
threads, and ``--compute`` places the model as the simulator's ``compute`` key does. Writes a JSON with per-round seconds and the first-train time.
"""

from __future__ import annotations

import time

LAUNCHED_AT = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fl.compute import peak_accelerator_memory, resolve_compute  # noqa: E402
from fl.local_training import ClientData, TrainHyper, evaluate, train_dense  # noqa: E402
from fl.sampling import sample_partitions, seed_for  # noqa: E402
from fl.specs import DataSpec, ModelSpec, freeze  # noqa: E402
from strategies import weighted_mean  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-clients", type=int, required=True)
    parser.add_argument("--fraction", type=float, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--samples-per-client", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute", default="cpu", help="cpu, cuda, cuda:N or auto (fl.compute)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data = DataSpec(name="synthetic", num_clients=args.num_clients, seed=args.seed,
                    partition=freeze({"name": "shards", "classes_per_client": 3}),
                    options=freeze({"samples_per_client": args.samples_per_client}))
    federation = data.federation()
    torch.manual_seed(args.seed)
    model = ModelSpec("cnn_small").build_for(federation).to(resolve_compute(args.compute))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    hyper = TrainHyper(epochs=1, batch_size=32, lr=0.05, momentum=0.0)  # engine_overhead.WORKLOAD
    per_round = max(int(args.num_clients * args.fraction), 2)
    test = ClientData(federation.test, np.arange(len(federation.test)))
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    first_train = None
    round_seconds = []
    for server_round in range(1, args.rounds + 1):
        started = time.perf_counter()
        states, weights = [], []
        for partition in sample_partitions(args.seed, server_round, "train", list(range(args.num_clients)), per_round):
            model.load_state_dict(global_state)
            client = ClientData(federation.train, federation.client_indices[partition])
            first_train = first_train or time.time()
            train_dense(model, client, hyper, torch.Generator().manual_seed(seed_for(args.seed, server_round, partition)))
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            weights.append(float(len(client)))
        global_state = weighted_mean(states, weights)
        if server_round == 1:  # the initial model, evaluated when the engine does (after round 1's training)
            model.load_state_dict(initial_state)
            evaluate(model, test)
        if server_round == args.rounds:
            model.load_state_dict(global_state)
            evaluate(model, test)
        round_seconds.append(time.perf_counter() - started)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"round_seconds": round_seconds, "first_train_s": first_train - LAUNCHED_AT,
                   "first_train_unix": first_train, "peak_gpu_bytes": peak_accelerator_memory()}, fh)


if __name__ == "__main__":
    main()
