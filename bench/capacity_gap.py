"""Capacity gap on the synthetic default: the small edge CNN against the VGG-style base.

Both models are trained centrally on the pooled training images of a synthetic federation
(default 100 clients x 50 = 5,000 images) and tested on its 2,000 test images, with the same
recipe (SGD, momentum 0.9, weight decay 5e-4, one-cycle learning rate, batch 64). DELTA and XDelta
need the base to be clearly better than the edge model; this prints both accuracies and the gap.

    python bench/capacity_gap.py                 # the shipped difficulty, about 10 minutes on 2 cores
    python bench/capacity_gap.py --difficulty 0.8 --epochs 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from report import add_out_option, recorded  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl.data import build_federation  # noqa: E402
from fl.data.synthetic import CLASSES, CONFUSABLE_PAIRS, DEFAULT_DIFFICULTY  # noqa: E402
from fl.models import get_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--samples-per-client", type=int, default=50)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--edge", default="cnn_small")
    p.add_argument("--edge-lr", type=float, default=0.05)
    p.add_argument("--base", default="vgg11")
    p.add_argument("--base-width", type=float, default=0.5)
    p.add_argument("--base-lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    add_out_option(p)
    args = p.parse_args()
    with recorded(args.out):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    fed = build_federation("synthetic", args.clients, args.seed, {"name": "iid"},
                           samples_per_client=args.samples_per_client, test_size=args.test_size,
                           difficulty=args.difficulty)
    x_train, y_train = fed.train.get(np.arange(len(fed.train)))
    x_test, y_test = fed.test.get(np.arange(len(fed.test)))
    print(f"data: synthetic difficulty={args.difficulty}, {len(fed.train)} train images "
          f"({args.clients} clients x {args.samples_per_client}), {len(fed.test)} test images, "
          f"rendered in {time.perf_counter() - start:.1f}s")
    print(f"recipe: {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, weight decay 5e-4, "
          f"one-cycle lr, seed {args.seed}, torch threads {args.threads}")

    results = {}
    for role, name, options, lr in (("edge", args.edge, {}, args.edge_lr),
                                    ("base", args.base, {"width": args.base_width}, args.base_lr)):
        torch.manual_seed(args.seed)
        model = get_model(name, num_classes=fed.num_classes, in_channels=fed.channels,
                          image_size=fed.image_size, **options)
        params = sum(t.numel() for t in model.parameters())
        t0 = time.perf_counter()
        train(model, x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, lr=lr, seed=args.seed)
        predictions = predict(model, x_test)
        accuracy = float((predictions == y_test).float().mean())
        results[role] = (name, accuracy, predictions)
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        print(f"{role}: {label} ({params:,} params, lr {lr}): test accuracy {100 * accuracy:.1f}% "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)

    print("pair accuracy (edge / base), on test images of the two classes:")
    for a, b, kind in CONFUSABLE_PAIRS:
        rows = (y_test == a) | (y_test == b)
        accs = [float((results[r][2][rows] == y_test[rows]).float().mean()) for r in ("edge", "base")]
        print(f"  {CLASSES[a].name} vs {CLASSES[b].name} ({kind}): {100 * accs[0]:.1f}% / {100 * accs[1]:.1f}%")
    gap = results["base"][1] - results["edge"][1]
    print(f"capacity gap: {results['base'][0]} {100 * results['base'][1]:.1f}% - {results['edge'][0]} "
          f"{100 * results['edge'][1]:.1f}% = {100 * gap:.1f} points  (total {time.perf_counter() - start:.0f}s)")


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
          seed: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            batch = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)])


if __name__ == "__main__":
    main()
