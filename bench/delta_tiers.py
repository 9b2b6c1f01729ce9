"""What each DELTA size tier trains, sends and scores, for the tier table of docs/strategy-delta.md.

    python bench/delta_tiers.py --run runs/<date>_<time>_delta [--delta-dir .cache/delta/pair-*/delta-*]
                                [--json results.json]

For every tier width of the run: the DELTA parameters a client of that width trains, the bytes of
its upload per round as the channel-slice codec serializes it (``fl.delta.slices.upload_sizes``,
the same function the strategy logs at start), both as a share of the full tier; the fused
accuracy of the central DELTA cut to that width (the construction's report), and of the global
model cut to it at the first and last rounds the run evaluated tiers
(``train/w<width>/global_accuracy`` in ``metrics.jsonl``), and the sampled clients' tier models on
their held-out split at the last such round (``fed_eval/w<width>/client_accuracy``). Nothing is
trained: the figures are the run's own logs and the cached DELTA's sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl.delta.network import DeltaArch, FusedDelta  # noqa: E402
from fl.delta.slices import upload_sizes, width_key  # noqa: E402
from fl.payload import get_codec  # noqa: E402
from fl.run_logger import read_metrics  # noqa: E402


def delta_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    cache = Path(os.environ.get("FL_DELTA_CACHE", ".cache/delta"))
    found = sorted(cache.glob("pair-*/delta-*"))
    if len(found) != 1:
        raise SystemExit(f"error: --delta-dir: found {len(found)} DELTAs under {cache}; name the run's one "
                         "(its log says 'using the cached DELTA in ...')")
    return found[0]


def tier_table(run: Path, built: Path) -> dict:
    arch = DeltaArch.from_json((built / "arch.json").read_text())
    report = json.loads((built / "report.json").read_text())
    widths = [float(w) for w in report["tiers"]]
    state = FusedDelta(arch).state_dict()
    sizes = upload_sizes(state, arch.to_json(), widths, get_codec("channel_slice_fp32"))
    rows = read_metrics(run)
    full_params, full_bytes = sizes[widths[0]]
    tiers = []
    for width in widths:
        key = width_key(width)
        logged = [(r["round"], r[f"train/{key}/global_accuracy"]) for r in rows
                  if f"train/{key}/global_accuracy" in r]
        clients = [(r["round"], r[f"fed_eval/{key}/client_accuracy"]) for r in rows
                   if f"fed_eval/{key}/client_accuracy" in r]
        params, up = sizes[width]
        tiers.append({"width": width, "params": params, "params_share": params / full_params, "up_bytes": up,
                      "up_share": up / full_bytes, "central_accuracy": report["tiers"][f"{width:.4f}"]["accuracy"],
                      "global_accuracy": logged, "client_accuracy": clients[-1] if clients else None})
    last = rows[-1]
    return {"run": str(run), "delta": str(built), "tiers": tiers, "rounds": last["round"],
            "final_accuracy": last.get("accuracy"), "up_mib": last["cum_up_bytes"] / 2 ** 20}


def markdown(table: dict) -> str:
    lines = ["| tier width | DELTA params | share | upload per client and round | share | central DELTA | "
             "global model, first / last tier round | clients' tier models, last round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table["tiers"]:
        first, last = (t["global_accuracy"][0], t["global_accuracy"][-1]) if t["global_accuracy"] else (None, None)
        glob = "-" if first is None else f"{first[1]:.4f} (r{first[0]}) / {last[1]:.4f} (r{last[0]})"
        client = "-" if t["client_accuracy"] is None else f"{t['client_accuracy'][1]:.4f}"
        lines.append(f"| {t['width']:.3f} | {t['params']:,} | {100 * t['params_share']:.1f}% | "
                     f"{t['up_bytes'] / 1024:,.1f} KiB | {100 * t['up_share']:.1f}% | {t['central_accuracy']:.4f} | "
                     f"{glob} | {client} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished DELTA run directory (metrics.jsonl)")
    parser.add_argument("--delta-dir", type=Path, help="the run's cached DELTA (arch.json, report.json)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not (args.run / "metrics.jsonl").exists():
        print(f"error: --run: {args.run} has no metrics.jsonl; give a finished run directory", file=sys.stderr)
        return 2
    built = delta_dir(args.delta_dir)
    if not (built / "arch.json").exists():
        print(f"error: --delta-dir: {built} has no arch.json; give a cached DELTA directory", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    table = tier_table(args.run, built)
    print(markdown(table))
    print(f"\nfinal accuracy {table['final_accuracy']}, {table['up_mib']:,.1f} MiB uploaded in {table['rounds']} rounds")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
