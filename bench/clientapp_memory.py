"""Memory of one deployed ClientApp process, what a SuperNode device must hold.

A SuperNode runs every message in a fresh ``flwr-clientapp`` process. This does what that process
does, in a fresh interpreter per model: import ``fl.deploy.client_app`` (torch and Flower), then
handle one train message as partition 0 of the default synthetic federation (``num_clients`` clients'
data built, as ``--node-config partition-id=0 num-partitions=N`` gives). It prints the resident
memory after the imports, the peak at the end of the round, and the model's weights in MiB.

    python bench/clientapp_memory.py
    python bench/clientapp_memory.py --out docs/results/clientapp_memory.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from report import add_out_option, recorded  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys
import psutil
rss = lambda: psutil.Process().memory_info().rss
from fl.deploy.client_app import app
after_imports = rss()
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from fl.message_keys import ARRAYS, CONFIG, METRICS, NUM_PARTITIONS, PARTITION_ID, SERVER_ROUND
from fl.models import get_model
from fl.engine.inprocess import identify_as_server
identify_as_server(1)  # a Message needs Flower's task identity; the SuperNode's process has its own
from fl.deploy.run_config import OVERRIDES, RUN_DIR
model, num_clients = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
weights = get_model(model, num_classes=10).state_dict()
arrays = ArrayRecord(weights)
train = Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({SERVER_ROUND: 1})}), 11, "train")
run_config = {OVERRIDES: f"model={model} num_clients={num_clients}", RUN_DIR: ""}
context = Context(run_id=1, node_id=11, node_config={PARTITION_ID: 0, NUM_PARTITIONS: num_clients},
                  state=RecordDict(), run_config=run_config)
reply = app(train, context)
assert not reply.has_error(), reply.error
print(json.dumps({"after_imports": after_imports, "end": rss(),
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "weights": sum(t.numel() * t.element_size() for t in weights.values()),
                  "samples": reply.content[METRICS]["num-examples"]}))
"""


def measure(model: str, num_clients: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(num_clients)], cwd=ROOT, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: the ClientApp process for {model} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn_small", "vgg11"])
    parser.add_argument("--num-clients", type=int, default=100)
    add_out_option(parser)
    args = parser.parse_args()
    mib = 1024 ** 2
    with recorded(args.out):
        print(f"one train message in a fresh ClientApp process, partition 0 of {args.num_clients} "
              f"(default synthetic data and training), torch {__import__('torch').__version__}")
        print(f"{'model':>12}  {'weights MiB':>11}  {'RSS after imports MiB':>21}  {'peak RSS MiB':>12}")
        for model in args.models:
            m = measure(model, args.num_clients)
            print(f"{model:>12}  {m['weights'] / mib:11.1f}  {m['after_imports'] / mib:21.0f}  {m['peak'] / mib:12.0f}")


if __name__ == "__main__":
    main()
