"""A round's payload handling with Flower's own ``.npy`` reader and writer against ``fl.payload``'s.

Encode: every client turns its trained state into ``.npy`` bytes (the ``dense_fp32`` codec), with
Flower's ``Array(ndarray)`` (``np.save``: the header's Python literal built for every array) or
with ``fl.payload.npy_array`` (the same bytes, the header taken once per dtype and shape).

Decode: a FedAvg server reads every reply's arrays three times: the metadata check of the
screening (``strategies.base.truthful_metadata``), the decode against the broadcast (the
``dense_fp32`` codec) and the aggregation (``strategies.base.weighted_mean``, which decodes again
so that one decoded state is held at a time); with Flower's ``Array.numpy()`` (``np.load``: the
header parsed per array) or with ``fl.payload.array_values`` (each distinct header parsed once).

Both over R replies of a model (default: 100 ``cnn_small`` replies, the engine-overhead workload
at N=1000), each way interleaved, in this one process, on one torch thread; prints the median
seconds per round and the ratio.

    python bench/payload_codec.py
    python bench/payload_codec.py --replies 100 --repeats 5 --out docs/results/payload_codec.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from flwr.app import Array
from report import add_out_option, recorded  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fl.payload.codec as codec  # noqa: E402
import strategies.base as base  # noqa: E402
from fl.payload import get_codec  # noqa: E402
from fl.specs import DataSpec, ModelSpec, freeze  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=int, default=100)
    parser.add_argument("--model", default="cnn_small")
    parser.add_argument("--repeats", type=int, default=5)
    add_out_option(parser)
    args = parser.parse_args()
    with recorded(args.out):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    federation = DataSpec(name="synthetic", num_clients=2, seed=0, partition=freeze({"name": "iid"}),
                          options=freeze({"samples_per_client": 2, "test_size": 2})).federation()
    reference = ModelSpec(args.model).build_for(federation).state_dict()
    dense = get_codec("dense_fp32")
    records = []
    for k in range(args.replies):
        torch.manual_seed(k)
        records.append(dense.encode({n: t + 0.01 * torch.randn_like(t) if t.is_floating_point() else t
                                     for n, t in reference.items()}))
    arrays = sum(len(r) for r in records)

    states = [dense.decode(record, reference) for record in records]

    def encode_round() -> float:
        started = time.perf_counter()
        for state in states:
            dense.encode(state)
        return time.perf_counter() - started

    def decode_round() -> float:
        started = time.perf_counter()
        for record in records:
            assert base.truthful_metadata(record) is None
            dense.decode(record, reference)
        base.weighted_mean([dense.decode(r, reference) for r in records], [1.0] * len(records))
        return time.perf_counter() - started

    flower_reader = lambda array, copy=True: array.numpy()  # noqa: E731
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        with mock.patch.object(codec, "npy_array", Array):
            times.setdefault(("encode", "Array(ndarray)"), []).append(encode_round())
        times.setdefault(("encode", "npy_array"), []).append(encode_round())
        with mock.patch.object(codec, "array_values", flower_reader), \
                mock.patch.object(base, "array_values", flower_reader):
            times.setdefault(("decode", "Array.numpy"), []).append(decode_round())
        times.setdefault(("decode", "array_values"), []).append(decode_round())
    print(f"{args.replies} {args.model} replies ({arrays} arrays): each encoded once, read 3 times; median of "
          f"{args.repeats} interleaved rounds, 1 torch thread")
    for step in ("encode", "decode"):
        (flower, flower_times), (ours, our_times) = [(name, t) for (s, name), t in times.items() if s == step]
        baseline = statistics.median(flower_times)
        for name, values in ((flower, flower_times), (ours, our_times)):
            median = statistics.median(values)
            print(f"{step} {name:>14}: {median:.3f} s per round, {median / baseline:.2f}x {flower}")

if __name__ == "__main__":
    main()
