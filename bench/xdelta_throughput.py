"""Explained images per second of XDelta on CPU for the shipped 32x32 pair (plugins/xdelta).

    python bench/xdelta_throughput.py                                  # the shipped config's pair
    python bench/xdelta_throughput.py --pair-dir .cache/delta/pair-<hash> [--delta delta-<hash>]
    python bench/xdelta_throughput.py --threads 1 --samples 1000 --repeats 3

By default it uses the pair cache that the shipped config (``sim_configs/pair/vgg11_cnn_small``,
synthetic data, seed 0) hashes to under ``.cache/delta`` (``FL_DELTA_CACHE``); when that has no
DELTA it stops with one line naming the directory and saying to pass ``--pair-dir`` (it never
trains: build the pair first with ``python -m fl.delta.pretrain``). It times
``plugins.xdelta.pipeline.explain`` (predictions of edge, edge+DELTA and base on ``--samples``
test images, GradCAM++ of the DELTA and the edge on the explained ones, regions, categories and
concepts; no report rendering) and prints explained images per second and evaluated images per
second, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import add_out_option, recorded  # noqa: E402  bench/, beside this script


def shipped_pair_dir(cache: str) -> Path:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from fl.delta.pair import PairSpec, pair_directory

    with initialize_config_module(config_module="sim_configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=delta"])
    pair = OmegaConf.to_container(cfg.model.pair, resolve=True)
    return pair_directory(PairSpec.from_options(pair), cache)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair-dir", default=None)
    p.add_argument("--delta", default=None)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--delta-map-size", type=int, default=None,
                   help="the DELTA layer GradCAM++ reads (default: the xdelta plugin's; 0: its last)")
    add_out_option(p)
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from fl.errors import ConfigError
    from plugins.xdelta.categories import Thresholds
    from plugins.xdelta.pipeline import explain
    from plugins.xdelta.saved import load_saved

    torch.set_num_threads(args.threads)
    pair_dir = Path(args.pair_dir) if args.pair_dir else shipped_pair_dir(os.environ.get("FL_DELTA_CACHE",
                                                                                          ".cache/delta"))
    try:
        saved = load_saved(pair_dir, args.delta)
    except ConfigError as err:
        hint = "" if args.pair_dir else " (the shipped config's pair; pass --pair-dir to use another cached pair)"
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    _, test = saved.datasets()
    size = {} if args.delta_map_size is None else {"delta_map_size": args.delta_map_size}
    n = min(args.samples, len(test))
    indices = np.arange(n)
    test.get(indices)  # render the images once, outside the timing
    test.masks(indices[:1])
    best = None
    for _ in range(args.repeats):
        started = time.perf_counter()
        e = explain(saved.fused, saved.base, test, indices, Thresholds(), batch_size=args.batch_size, **size)
        seconds = time.perf_counter() - started
        best = seconds if best is None else min(best, seconds)
    with recorded(args.out):
        print(f"pair {saved.pair_dir} / {saved.delta_dir.name}; torch threads {torch.get_num_threads()}; "
              f"diffuse DELTA regions {e.summary()['diffuse']}")
        print(f"evaluated {n} test images, explained {len(e)} (edge wrong, base right); best of {args.repeats}: "
              f"{best:.2f} s")
        print(f"{len(e) / best:.1f} explained images/s, {n / best:.1f} evaluated images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
