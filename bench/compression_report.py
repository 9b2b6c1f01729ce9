"""Accuracy against uploaded bytes for the update codecs, measured with the simulator itself.

One FedAvg run per upload codec on the same workload (the shipped config: synthetic data with
3-of-10-classes shards, ``cnn_small``, 1 local epoch, batch 32, lr 0.05, seed 0), every run
starting from the same initial model and sampling the same clients. Uploaded bytes are the
run's ``cum_up_bytes``: the metered payload of every reply, as serialized. Prints two markdown
tables: the totals, and accuracy at each round against cumulative uploaded MiB.

    python bench/compression_report.py                       # 30 clients, 10 rounds, 6 codecs
    python bench/compression_report.py --codecs dense_fp32 int8 --rounds 5 --jobs 1

Each codec runs in its own process (``--jobs`` at a time, default 2 on this 2-core machine).
Last, the ``compression`` plugin's before/after table for the dense run's final global model;
``--sweep 0.25 0.75`` adds pruning ratios to it and ``--figure tradeoff.png`` draws its accuracy
against size and MACs (``fl.figures.accuracy_tradeoff``, as the plugin logs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from report import add_out_option, recorded  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the model-compression table imports the simulator in this process
CODECS = ["dense_fp32", "fp16", "int8", "topk_0.1", "topk_0.01", "topk_0.01+int8"]
LABELS = {"dense_fp32": "dense fp32", "fp16": "fp16 (weights)", "int8": "int8 (update)",
          "topk_0.1": "top-k 10%", "topk_0.01": "top-k 1%", "topk_0.01+int8": "top-k 1% + int8"}


def run_one(codec: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """Run ``fl.simulate`` with ``codec.up=<codec>`` in a fresh process; return its rows."""
    run_dir = out_dir / codec.replace("+", "_")
    overrides = [f"num_clients={args.num_clients}", f"rounds={args.rounds}", f"fraction_fit={args.fraction}",
                 f"seed={args.seed}", f"codec.up={codec}", "progress=false", "tensorboard=false",
                 f"hydra.run.dir={run_dir}", *args.extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.time()
    if args.reuse and (run_dir / "summary.json").exists():
        return _load(codec, run_dir, 0.0)
    proc = subprocess.run([sys.executable, "-m", "fl.simulate", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"codec {codec} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return _load(codec, run_dir, time.time() - started)


def _load(codec: str, run_dir: Path, seconds: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"codec": codec, "rows": rows, "summary": summary, "seconds": seconds}


def tables(results: list[dict]) -> str:
    dense = next((r for r in results if r["codec"] == "dense_fp32"), results[0])
    dense_up = dense["summary"]["cum_up_bytes"]
    out = ["| upload codec | final accuracy | best accuracy | uploaded MiB | share of dense | bytes / client-round |",
           "|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        client_rounds = sum(row["clients"] for row in r["rows"])
        out.append(f"| {LABELS.get(r['codec'], r['codec'])} (`{r['codec']}`) | {s['final_accuracy']:.3f} | "
                   f"{s['best_accuracy']:.3f} | {s['cum_up_bytes'] / 2**20:.2f} | "
                   f"{100 * s['cum_up_bytes'] / dense_up:.2f}% | {s['cum_up_bytes'] / max(client_rounds, 1):,.0f} |")
    out += ["", "Accuracy after each round (cumulative uploaded MiB in brackets):", "",
            "| round | " + " | ".join(LABELS.get(r["codec"], r["codec"]) for r in results) + " |",
            "|---|" + "---|" * len(results)]
    rounds = max(len(r["rows"]) for r in results)
    for i in range(rounds):
        cells = []
        for r in results:
            row = r["rows"][i] if i < len(r["rows"]) else None
            cells.append("" if row is None or row["accuracy"] is None else
                         f"{row['accuracy']:.3f} ({row['cum_up_bytes'] / 2**20:.2f})")
        out.append(f"| {r['rows'][i]['round'] if i < len(r['rows']) else i} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="+", default=CODECS)
    parser.add_argument("--num-clients", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs-dir", default=None, help="keep the run directories here (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --runs-dir: read runs already finished there instead of running them again")
    parser.add_argument("--no-model-compression", action="store_true",
                        help="skip the compression plugin's table for the dense run's final model")
    parser.add_argument("--finetune-epochs", type=int, default=1,
                        help="fine-tuning epochs after pruning for that table (on 1000 training images)")
    parser.add_argument("--sweep", type=float, nargs="*", default=[],
                        help="more pruning ratios for that table (structured and unstructured at each)")
    parser.add_argument("--figure", default=None, help="write that table's accuracy vs size/MACs figure here (PNG)")
    parser.add_argument("extra", nargs="*", help="further Hydra overrides for every run, e.g. model=resnet8")
    add_out_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, recorded(args.out):
        out_dir = Path(args.runs_dir or tmp)
        started = time.time()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda c: run_one(c, args, out_dir), args.codecs))
        print(f"FedAvg, synthetic, cnn_small, {args.num_clients} clients, fraction_fit {args.fraction}, "
              f"{args.rounds} rounds, seed {args.seed}, overrides {args.extra}; "
              f"{sum(r['seconds'] for r in results):.0f} s of runs\n")
        print(tables(results))
        dense = next((r for r in results if r["codec"] == "dense_fp32"), None)
        if dense is not None and not args.no_model_compression:
            print("\nModel compression of the dense run's final global model (plugin `compression`: defaults, "
                  f"finetune_epochs={args.finetune_epochs}):\n")
            print(model_compression_table(args, out_dir / "dense_fp32"))


def model_compression_table(args: argparse.Namespace, run_dir: Path) -> str:
    """The ``compression`` plugin's table for a finished run's final model, on the run's own data."""
    import torch
    from flwr.app import ArrayRecord
    from hydra import compose, initialize_config_module

    from fl.config import build
    from fl.hooks import RunView
    from plugins.compression import ModelCompression, table

    overrides = [f"num_clients={args.num_clients}", f"rounds={args.rounds}", f"seed={args.seed}", *args.extra]
    with initialize_config_module(config_module="sim_configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    spec, _, _ = build(cfg, str(run_dir))  # (server spec, engine, faults)
    federation = spec.client.data.federation()

    def build_model():
        return spec.client.model.build_for(federation)

    def load(arrays):
        model = build_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        return model

    final = ArrayRecord(torch.load(run_dir / "final_model.pt"))
    view = RunView(run_dir=str(run_dir), federation=federation, build_model=build_model, load_global=load,
                   num_rounds=args.rounds, initial_arrays=final)
    plugin = ModelCompression(seed=args.seed, finetune_epochs=args.finetune_epochs, sweep=args.sweep)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = plugin.compare(view, final)
    if args.figure:
        from fl import figures
        from plugins.compression.plugin import tradeoff_series

        figures.save_png(figures.accuracy_tradeoff(tradeoff_series(rows), title="compression of the final global model"),
                         args.figure)
    return table(rows)


if __name__ == "__main__":
    main()
