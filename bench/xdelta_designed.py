"""Re-run XDelta's designed-weakness check (the slow test in ``tests/test_xdelta.py``) with another
seed or class set, and print what the explanations say.

    python bench/xdelta_designed.py                                   # the test's pair, seed 0
    python bench/xdelta_designed.py --seed 1
    python bench/xdelta_designed.py --classes box-spot box-cross box-mouth --blind-to box-cross \\
        --seen-as box-spot --train 3000 --base-epochs 30

The edge is trained with ``--blind-to`` labelled ``--seen-as`` (two classes that differ by one
part), so it never learns that part; the check expects the explained samples in LOCAL_ENHANCE and
the part as the blind class's top missed concept. About 100 s on one core with the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import add_out_option, recorded  # noqa: E402  bench/, beside this script


def main(argv: list[str] | None = None) -> int:
    from fl.data.synthetic import CLASSES

    names = [c.name for c in CLASSES]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", nargs="+", default=["disc-left_eye", "disc-both_eyes", "box-spot"],
                   help=f"synthetic class names, from {names}")
    p.add_argument("--blind-to", default="disc-both_eyes", help="the class the edge is never taught")
    p.add_argument("--seen-as", default="disc-left_eye", help="the label the edge is given for it instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=1800, help="training images per class, times 10 / classes")
    p.add_argument("--base-epochs", type=int, default=12)
    add_out_option(p)
    a = p.parse_args(argv)
    for option, value in [("--classes", c) for c in a.classes] + [("--blind-to", a.blind_to), ("--seen-as", a.seen_as)]:
        if value not in names:
            p.error(f"{option}: unknown class {value!r}; choose from {names}")
    if a.blind_to not in a.classes or a.seen_as not in a.classes or a.blind_to == a.seen_as:
        p.error("--blind-to and --seen-as must be two different classes named in --classes")

    import torch

    from plugins.xdelta.categories import Thresholds
    from plugins.xdelta.pipeline import explain
    from tests.xdelta_designed import designed_pair

    torch.set_num_threads(1)
    started = time.perf_counter()
    classes = [names.index(c) for c in a.classes]
    blind = a.classes.index(a.blind_to)
    fused, base, test = designed_pair(classes, blind_to=blind, seen_as=a.classes.index(a.seen_as),
                                      train_n=a.train, base_epochs=a.base_epochs, seed=a.seed)
    e = explain(fused, base, test, np.arange(len(test)), Thresholds())
    summary = e.summary()
    counts = summary["category_counts"]
    expected = counts.get("LOCAL_ENHANCE", 0)
    with recorded(a.out):
        print(json.dumps({"accuracy": e.predictions.accuracy(), "explained": len(e), "counts": counts,
                          "local_enhance_share": expected / max(len(e), 1), "diffuse": summary["diffuse"],
                          "blind_class_top_concepts": e.concept_counts.top(3, blind) if len(e) else [],
                          "median_region_pixels": {"delta": int(e.delta_region.flatten(1).sum(1).median()) if len(e) else 0,
                                                   "edge": int(e.edge_region.flatten(1).sum(1).median()) if len(e) else 0},
                          "seconds": round(time.perf_counter() - started, 1)}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
