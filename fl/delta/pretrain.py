"""``python -m fl.delta.pretrain [overrides]``: the central DELTA step alone, and its report.

Takes the same config and overrides as ``python -m fl.simulate`` (``sim=delta_100clients``,
``model.pair.server_samples=...``), trains the edge/base pair on the server split and builds the
DELTA (or loads both from ``model.cache_dir``), then prints the XDELTA report: accuracies of the
base, the edge, the fused edge+DELTA and the distilled edge, parameter and MAC ratios, the
correlation score, the accuracy of every width tier and, when the server pretrains on another
distribution than the task's (``model.pair.server_difficulty``), the base, edge and fused accuracy
on the server's own held-out data. A later ``fl.simulate`` with the same config finds everything
cached. The steps run on the ``compute`` device (``compute=cuda``, as for ``fl.simulate``; default
auto).

    python -m fl.delta.pretrain sim=delta_100clients
    python -m fl.delta.pretrain sim=delta_100clients --json report.json
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Mapping

from fl.errors import ConfigError


def main(argv: list[str]) -> int:
    json_path = None
    if "--json" in argv:
        i = argv.index("--json")
        json_path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from fl.compute import resolve_compute
    from fl.delta.construct import ConstructionSpec, ensure_delta
    from fl.delta.pair import PairSpec, ensure_pair

    with initialize_config_module(config_module="sim_configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv)
    model: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    started = time.perf_counter()
    try:
        if model.get("name") not in ("delta_fused", "pretrained"):
            raise ConfigError("model", f"{model.get('name')!r} has nothing to pretrain; use model=delta "
                                       "(or sim=delta_100clients)")
        device = resolve_compute(cfg.get("compute", "auto"))  # one error line before any work
        pair = PairSpec.from_options(model["pair"])
        cache, threads = str(model.get("cache_dir", ".cache/delta")), model.get("threads")
        if model["name"] == "pretrained":
            built = ensure_pair(pair, cache, threads=threads, compute=device)
            report, directory = built.report, built.directory
        else:
            constructed = ensure_delta(pair, ConstructionSpec.from_options(model.get("construction")), cache,
                                       threads=threads, compute=device)
            report, directory = {**ensure_pair(pair, cache).report, **constructed.report}, constructed.directory
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"cached in {directory} ({time.perf_counter() - started:.0f} s)")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


def format_report(r: Mapping[str, Any]) -> str:
    """The XDELTA figures as a Markdown table (what docs/strategy-delta.md quotes)."""
    if "fused_accuracy" not in r:
        return "\n".join(f"{role}: test accuracy {r[role]['test_accuracy']:.4f} ({r[role]['seconds']} s)"
                         for role in ("base", "edge") if role in r)
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    p, m, c = r["params"], r["macs"], r["correlation"]
    rows = [
        ("base accuracy", pct(r["base_accuracy"])),
        ("edge accuracy", pct(r["edge_accuracy"])),
        ("edge + DELTA (fused) accuracy", pct(r["fused_accuracy"])),
        ("gain over the edge", f"{100 * r['gain_over_edge']:+.2f} points"),
        ("gap to the base", f"{100 * r['gap_to_base']:.2f} points"),
        ("KD baseline (edge distilled from base)", pct(r["kd_edge_accuracy"]) if "kd_edge_accuracy" in r else "-"),
        ("DELTA parameters", f"{p['delta']:,} ({', '.join(f'{k} {v:,}' for k, v in p['delta_parts'].items())})"),
        ("P_D/E, F_D/E", f"{pct(r['P_D/E'])}, {pct(r['F_D/E'])}"),
        ("P_D/B, F_D/B", f"{pct(r['P_D/B'])}, {pct(r['F_D/B'])}"),
        ("edge / base parameters, MACs", f"{p['edge']:,} / {p['base']:,}, {m['edge']:,} / {m['base']:,}"),
        ("DELTA subgraph convs", ", ".join(str(ch) for ch in r["arch"]["convs"])),
        ("correlation R vs A, edge wrong & base right",
         f"{c.get('feature_wise_subset', float('nan')):+.3f} feature-wise, "
         f"{c.get('sample_wise_subset', float('nan')):+.3f} sample-wise ({c['edge_wrong_base_right']} samples)"),
        ("correlation R vs A, all test samples",
         f"{c['feature_wise_all']:+.3f} feature-wise, {c['sample_wise_all']:+.3f} sample-wise"),
    ]
    if "server_domain" in r:
        d = r["server_domain"]
        rows.append((f"on the server's own data (difficulty {d['difficulty']}, {d['test_samples']} held-out images): "
                     "base, edge, fused; gap", f"{pct(d['base_accuracy'])}, {pct(d['edge_accuracy'])}, "
                     f"{pct(d['fused_accuracy'])}; {100 * d['gap_to_base']:.2f} points"))
    rows += [(f"tier width {w}: fused accuracy (DELTA params)", f"{pct(t['accuracy'])} ({t['params']:,})")
             for w, t in r["tiers"].items()]
    rows.append(("server / test images", f"{r['server_samples']} / {r['test_samples']}"))
    rows.append(("central steps (s)", ", ".join(f"{k} {v}" for k, v in r["timings"].items())))
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
