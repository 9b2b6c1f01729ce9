"""AgileNN (Huang and Gao, MobiCom 2022): training-step overhead, skewness reached and accuracy
against the same network trained without the split, centrally on the synthetic data.

1. Overhead: one SGD step of AgileNN (differentiable 2-point IG against the frozen reference,
   skewness + disorder losses, quantized remote head, alpha) against a plain step of the same
   split network (same forward, CE only), on the same batches, in this invocation, alternating
   step by step ``--timing-rounds`` times over ``--timing-steps`` batches; the ratio of medians is printed (target <= 2.5x).
2. Accuracy: pretrain the extractor + reference (CE, ``--pretrain-epochs``), Algorithm 1, then
   ``--epochs`` of AgileNN; against the unsplit network (the same extractor and remote head on
   all channels, no quantization) trained with CE for ``--pretrain-epochs + --epochs``. Prints
   skewness (target: rho within 2 points), disorder rate, alpha, local / remote / combined
   accuracy (target: combined within 3 points of the unsplit network) and coded bytes per
   offloaded sample.

    taskset -c 1 env OMP_NUM_THREADS=1 python bench/agilenn_overhead.py           # a few minutes, one core
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from report import add_out_option, recorded  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl.data import build_federation  # noqa: E402
from fl.local_training import TrainHyper  # noqa: E402
from plugins.agilenn.network import agilenn  # noqa: E402
from plugins.agilenn.selection import permute_channels, ranking, topk_counts  # noqa: E402
from plugins.agilenn.training import (AgileHyper, AgileLoss, measure, optimizer_for, plain_loss,  # noqa: E402
                                      pretrain_loss)


def batches(x, y, batch_size, generator):
    order = torch.randperm(len(y), generator=generator)
    for s in range(0, len(y), batch_size):
        idx = order[s:s + batch_size]
        yield x[idx], y[idx]


def train(model, x, y, epochs, hyper, loss_fn, generator, scheduler_total=None):
    model.train()
    optimizer = optimizer_for(model, hyper)
    for _ in range(epochs):
        for xb, yb in batches(x, y, hyper.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, xb, yb)[0].backward()
            optimizer.step()


def time_step(model, optimizer, loss_fn, xb, yb) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model, xb, yb)[0].backward()
    optimizer.step()
    return time.perf_counter() - started


def overhead(args, fed, x, y) -> None:
    torch.manual_seed(args.seed)
    model = agilenn(num_classes=fed.num_classes, in_channels=fed.channels)
    model.freeze_reference(True)
    model.train()
    hyper = TrainHyper(lr=0.01, momentum=0.0, batch_size=args.batch_size)
    agile = AgileLoss(AgileHyper(), fed.num_classes)
    optimizer = optimizer_for(model, hyper)
    steps = [(x[s:s + args.batch_size], y[s:s + args.batch_size]) for s in range(0, args.timing_steps * args.batch_size, args.batch_size)]
    for xb, yb in steps[:2]:  # warm-up
        time_step(model, optimizer, plain_loss, xb, yb)
        time_step(model, optimizer, agile, xb, yb)
    plain, agl = [], []
    for _ in range(args.timing_rounds):  # interleaved step by step, so both see the same machine load
        for xb, yb in steps:
            plain.append(time_step(model, optimizer, plain_loss, xb, yb))
            agl.append(time_step(model, optimizer, agile, xb, yb))
    p, a = statistics.median(plain), statistics.median(agl)
    print(f"step time, batch {args.batch_size}, torch threads {torch.get_num_threads()}: plain {p * 1e3:.1f} ms, "
          f"AgileNN {a * 1e3:.1f} ms (median of {len(plain)} each) -> overhead {a / p:.2f}x (target <= 2.5x)")


def accuracy(args, fed, x, y) -> None:
    num_classes = fed.num_classes
    xt, yt = fed.test.get(np.arange(len(fed.test)))
    hyper = TrainHyper(lr=args.lr, momentum=0.9, weight_decay=5e-4, batch_size=args.batch_size)
    test_batches = [(xt[s:s + 500], yt[s:s + 500]) for s in range(0, len(yt), 500)]

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = agilenn(num_classes=num_classes, in_channels=fed.channels)
    g = torch.Generator().manual_seed(args.seed)
    train(model, x, y, args.pretrain_epochs, hyper, pretrain_loss, g)
    model.freeze_reference(True)
    model.eval()
    agile = AgileLoss(AgileHyper(rho=args.rho, lam=args.lam), num_classes)
    counts = torch.zeros(model.channels, dtype=torch.int64)
    values = []
    for s in range(0, len(y), 500):
        with torch.no_grad():
            f = model.extractor(x[s:s + 500])
        counts += topk_counts(agile.importance(model, f, y[s:s + 500], create_graph=False), model.k)
        values.append(f.flatten())
    permute_channels(model, ranking(counts))
    levels = model.quantizer.levels
    with torch.no_grad():
        model.quantizer.centroids.copy_(torch.quantile(torch.cat(values)[:1_000_000],
                                                       torch.linspace(0.5 / levels, 1 - 0.5 / levels, levels)))
    before = measure(model, test_batches, agile)
    train(model, x, y, args.epochs, hyper, agile, g)
    split = measure(model, test_batches, agile)
    split_s = time.perf_counter() - started

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    plain = agilenn(num_classes=num_classes, in_channels=fed.channels, split=False)
    g = torch.Generator().manual_seed(args.seed)
    train(plain, x, y, args.pretrain_epochs + args.epochs, hyper, plain_loss, g)
    plain.eval()
    with torch.no_grad():
        plain_acc = float(sum(int((plain(xb).argmax(1) == yb).sum()) for xb, yb in test_batches)) / len(yt)
    plain_s = time.perf_counter() - started

    data = f"synthetic images (difficulty {fed.train.difficulty})" if args.data == "synthetic" else f"{args.data} images"
    print(f"accuracy: {len(y)} train / {len(yt)} test {data}, SGD lr {args.lr} momentum 0.9 wd 5e-4, "
          f"batch {args.batch_size}; AgileNN: {args.pretrain_epochs} pretrain + {args.epochs} epochs "
          f"(rho {args.rho}, lambda {args.lam}), {split_s:.0f} s; unsplit: {args.pretrain_epochs + args.epochs} epochs, {plain_s:.0f} s")
    print(f"  after Algorithm 1 (before AgileNN training): skewness {before['skewness']:.3f}, "
          f"disorder rate {before['disorder_rate']:.3f}")
    print(f"  AgileNN: skewness {split['skewness']:.3f} (required {args.rho}: "
          f"{'reached' if split['skewness'] >= args.rho - 0.02 else 'NOT reached'} within 2 points), "
          f"disorder rate {split['disorder_rate']:.3f}, alpha {split['alpha']:.3f}")
    print(f"  accuracy: local {split['local_accuracy']:.4f}, remote {split['remote_accuracy']:.4f}, "
          f"combined {split['combined_accuracy']:.4f}; unsplit network {plain_acc:.4f} -> gap "
          f"{(plain_acc - split['combined_accuracy']) * 100:+.2f} points (target <= 3)")
    print(f"  offloaded bytes per sample: {split['bytes_per_sample']:.1f} coded "
          f"(vs {split['raw_bytes_per_sample']:.0f} as fp32)")


def federation(args):
    """One client holding the training images; synthetic scenes, or a torchvision dataset's files."""
    if args.data == "synthetic":
        options = {} if args.difficulty is None else {"difficulty": args.difficulty}
        return build_federation("synthetic", 1, args.seed, {"name": "iid"}, samples_per_client=args.train_size,
                                test_size=args.test_size, **options)
    return build_federation(args.data, 1, args.seed, {"name": "iid"}, root=args.root, download=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rho", type=float, default=0.8)
    p.add_argument("--lam", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=float, default=None, help="synthetic scene difficulty (default: the data's)")
    p.add_argument("--data", default="synthetic", help="synthetic, or a torchvision dataset read from --root "
                   "(mnist: the official test files alone, split into train and test, work offline)")
    p.add_argument("--root", default="../shared/data", help="folder of the torchvision dataset's files")
    p.add_argument("--skip-accuracy", action="store_true")
    add_out_option(p)
    args = p.parse_args()
    with recorded(args.out):
        fed = federation(args)
        x, y = fed.train.get(np.arange(min(len(fed.train), args.train_size)))
        overhead(args, fed, x, y)
        if not args.skip_accuracy:
            accuracy(args, fed, x, y)


if __name__ == "__main__":
    main()
