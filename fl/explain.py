"""``python -m fl.explain``: XDelta on saved models (plugins/xdelta; Wang and Nirjon, XDELTA).

    python -m fl.explain --pair-dir .cache/delta/pair-<hash> --out xdelta_out
    python -m fl.explain --pair-dir .cache/delta/pair-<hash> --delta delta-<hash> --samples 1000 \\
        --compression --threshold 0.4

reads a pair cached by ``fl.delta.pair`` (``pair.json``, ``base.pt``, ``edge.pt``) and one of its
DELTAs (``delta-<hash>/arch.json``, ``fused.pt``), explains the first ``--samples`` images of the
pair's test set and writes into ``--out``:

| file | contents |
|---|---|
| ``report.html`` | self-contained (base64 PNGs): categories, missed concepts, studies, overlays with scores |
| ``summary.json`` | counts and mean scores per category, accuracies, top concepts, study tables |
| ``scores.jsonl`` | one row per explained sample: category, overlap, locality, areas, concepts, coverage |
| ``events.out.tfevents.*`` | the same Report the ``xdelta`` plugin logs, under ``plugin/xdelta/`` (``fl.run_logger``) |

``--compute`` places the models (auto, the default: CUDA when torch sees a GPU; cpu; cuda; cuda:N;
as the simulator's ``compute`` key, ``fl.compute``); scores and reports are computed on the CPU.

Bad input stops before any work with one line ``error: <option>: <problem>`` and exit status 2;
the outputs are written into a temporary folder renamed into place at the end, so a failed run
leaves nothing half-written (an existing ``--out`` is refused unless ``--force``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fl.errors import ConfigError


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fl.explain", description=__doc__.split("\n\n")[0])
    p.add_argument("--pair-dir", required=True, help="a cached pair: pair.json, base.pt, edge.pt, delta-*/")
    p.add_argument("--delta", default=None, help="the DELTA directory (name inside --pair-dir or a path)")
    p.add_argument("--out", default="xdelta_out", help="output folder (default: xdelta_out)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--samples", type=int, default=500, help="test images evaluated (default 500)")
    p.add_argument("--reference", default="base", choices=("base", "fused"))
    p.add_argument("--threshold", type=float, default=None, help="region threshold, share of the map's maximum")
    p.add_argument("--delta-map-size", type=int, default=None,
                   help="GradCAM++ on the DELTA's last layer with a map at least this large (default: the xdelta "
                        "plugin's; 0: its SE output, the paper's last feature layer, at any size)")
    p.add_argument("--examples", type=int, default=8, help="overlays per category")
    p.add_argument("--compression", action="store_true", help="also the pruned-edge study (trains 3 DELTAs)")
    p.add_argument("--no-opportunistic", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute", default="auto", help="device the models run on: auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-tensorboard", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    try:
        out = Path(args.out)
        if out.exists() and not args.force:
            raise ConfigError("--out", f"{out} exists; choose another folder or pass --force")
        if args.samples < 1:
            raise ConfigError("--samples", f"must be >= 1, got {args.samples}")
        from fl.compute import resolve_compute
        from plugins.xdelta.analysis import XDeltaSettings
        from plugins.xdelta.categories import Thresholds
        from plugins.xdelta.gradcam import DELTA_MAP_SIZE, delta_layer
        from plugins.xdelta.saved import load_saved

        try:
            thresholds = Thresholds() if args.threshold is None else Thresholds(region_fraction=args.threshold)
        except ValueError as exc:
            raise ConfigError("--threshold", str(exc)) from None
        device = resolve_compute(args.compute, key="--compute")
        saved = load_saved(args.pair_dir, args.delta)
        train, test = saved.datasets()
        map_size = DELTA_MAP_SIZE if args.delta_map_size is None else args.delta_map_size
        try:
            delta_layer(saved.fused, (test.channels, test.image_size, test.image_size), map_size)
        except ValueError as exc:
            raise ConfigError("--delta-map-size", str(exc)) from None
        settings = XDeltaSettings(samples=args.samples, reference=args.reference, thresholds=thresholds,
                                  delta_map_size=map_size, examples=max(0, args.examples),
                                  opportunistic=not args.no_opportunistic, compression=args.compression, seed=args.seed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from plugins.xdelta.analysis import analyze, html, to_report
    from plugins.xdelta.report import diffuse_line

    result = analyze(saved.fused.to(device), saved.base.to(device), test, settings, train)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "report.html").write_text(html(result, test, settings, title=f"XDelta: {saved.delta_dir}"),
                                         encoding="utf-8")
        summary = {**result.summary, "pair_dir": str(saved.pair_dir), "delta_dir": str(saved.delta_dir),
                   "studies": result.raw}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        with open(tmp / "scores.jsonl", "w", encoding="utf-8") as fh:
            for row in result.explanation.records():
                fh.write(json.dumps(row) + "\n")
        if not args.no_tensorboard:
            from fl.run_logger import RunLogger

            logger = RunLogger(tmp)
            logger.log_report("xdelta", to_report(result, test, settings), 0)
            logger.close()
            (tmp / "metrics.jsonl").unlink(missing_ok=True)  # RunLogger's round log; nothing per round here
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    s = result.summary
    counts = ", ".join(f"{c} {r['count']}" for c, r in s["categories"].items() if r["count"])
    print(f"explained {s['explained']} of {s['evaluated']} test images ({counts or 'none'})")
    print(diffuse_line(s))
    if "top_concepts" in s:
        print("top missed concepts: " + ", ".join(f"{n} {f:.2f}" for n, f in s["top_concepts"]))
    print(f"wrote {out}/report.html, summary.json, scores.jsonl ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
