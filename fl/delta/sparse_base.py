"""The server's sparse pretraining of the pair's base, the starting point of a comparison's
FedDST-like arm.

Every arm of a comparison starts from what the server can pretrain on its split in that arm's
model family. FedDST (Bibikar et al., AAAI 2022) trains a network at sparsity S throughout, so its
comparable start is the pair's pretrained base pruned by magnitude to FedDST's own ERK budgets
(``fl.sparsity``) and retrained under that mask on the same server split (prune, then retrain the
survivors: Han et al., "Learning both Weights and Connections for Efficient Neural Networks",
NeurIPS 2015). Handing FedDST the dense base instead makes its first server step a one-shot 80%
magnitude pruning of a model trained dense, which no client round can repair quickly.

FedDST's first mask keeps each layer's K_l weights of largest magnitude; on this model those are
exactly its K_l nonzero weights, so the federation starts from the retrained sparse model as it is.
Cached next to the pair: ``<pair dir>/sparse-<hash>/base.pt`` and ``report.json``. The masks are
chosen on the CPU; the retraining runs on the ``compute`` device (``fl.compute``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import nn

from fl.compute import CPU, resolve_compute
from fl.delta.pair import (PairSpec, Recipe, accuracy, digest, ensure_pair, pair_directory, predict,
                           server_split, tensors, train_classifier)
from fl.errors import ConfigError
from fl.outputs import atomic_save, atomic_write_text
from fl.threads import central_threads
from fl.sparsity import apply_mask, erk_budgets, magnitude_masks, prunable_shapes

log = logging.getLogger("fl.delta")


@dataclass(frozen=True)
class SparseSpec:
    """What determines the sparse base (with the pair's spec, its cache key)."""

    sparsity: float
    dense_layers: tuple[str, ...] = ()
    finetune: Recipe = Recipe(epochs=10, lr=0.01, shift=2)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "SparseSpec":
        o = dict(options)
        unknown = sorted(set(o) - {"sparsity", "dense_layers", "finetune"})
        if unknown:
            raise ConfigError(f"model.sparse.{unknown[0]}", "unknown option; allowed: sparsity, dense_layers, finetune")
        sparsity = float(o.get("sparsity", 0.0))
        if not 0.0 < sparsity < 1.0:
            raise ConfigError("model.sparse.sparsity", f"must be in (0, 1), got {sparsity}")
        try:
            finetune = Recipe(**dict(o["finetune"])) if o.get("finetune") else cls.finetune
        except TypeError as exc:
            raise ConfigError("model.sparse.finetune", str(exc)) from None
        return cls(sparsity, tuple(str(n) for n in o.get("dense_layers") or ()), finetune)


def ensure_sparse_base(pair: PairSpec, spec: SparseSpec, cache_dir: str | os.PathLike, *,
                       threads: int | None = None, compute: str | torch.device = "auto") -> nn.Module:
    """The pair's base at ``spec.sparsity``, on the CPU: loaded from the cache, or pruned, retrained
    on the ``compute`` device and cached."""
    base = ensure_pair(pair, cache_dir, threads=threads, compute=compute).base
    directory = pair_directory(pair, cache_dir) / f"sparse-{digest(asdict(spec))}"
    weights, report_path = directory / "base.pt", directory / "report.json"
    if weights.exists() and report_path.exists():
        base.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        log.info("using the cached sparse base in %s (%s)", directory, _summary(json.loads(report_path.read_text())))
        return base
    directory.mkdir(parents=True, exist_ok=True)
    train, test = server_split(pair)
    device = resolve_compute(compute)
    x, y = tensors(train, device=device)
    x_test, y_test = tensors(test, device=device)
    started = time.perf_counter()
    with central_threads(threads), torch.random.fork_rng():
        state = base.state_dict()
        budgets = erk_budgets(prunable_shapes(state), spec.sparsity, spec.dense_layers, key="model.sparse.dense_layers")
        masks = magnitude_masks(state, budgets)
        pruned = apply_mask(state, masks)  # on the CPU, before the model moves
        base.to(device)
        masks = {name: mask.to(device) for name, mask in masks.items()}
        dense_accuracy = accuracy(predict(base, x_test), y_test)
        base.load_state_dict(pruned)
        pruned_accuracy = accuracy(predict(base, x_test), y_test)
        log.info("sparse base: pruned to sparsity %.2f by magnitude (test accuracy %.4f -> %.4f); retraining on "
                 "%d server images for %d epochs", spec.sparsity, dense_accuracy, pruned_accuracy, len(x),
                 spec.finetune.epochs)
        parameters = dict(base.named_parameters())

        @torch.no_grad()
        def hold_mask() -> None:
            for name, mask in masks.items():
                parameters[name].mul_(mask)

        train_classifier(base, x, y, spec.finetune, pair.seed, label="sparse base", after_step=hold_mask)
        base.eval()
    report = {"sparsity": spec.sparsity, "dense_accuracy": dense_accuracy, "pruned_accuracy": pruned_accuracy,
              "retrained_accuracy": accuracy(predict(base, x_test), y_test),
              "nonzero": int(sum(int((base.state_dict()[n] != 0).sum()) for n in budgets)),
              "budget": int(sum(budgets.values())), "seconds": round(time.perf_counter() - started, 1)}
    atomic_save(base.to(CPU).state_dict(), weights)
    atomic_write_text(report_path, json.dumps(report, indent=2))
    log.info("sparse base cached in %s (%s)", directory, _summary(report))
    return base


def _summary(report: Mapping[str, Any]) -> str:
    return (f"sparsity {report['sparsity']:.2f}: test accuracy dense {report['dense_accuracy']:.4f}, pruned "
            f"{report['pruned_accuracy']:.4f}, retrained {report['retrained_accuracy']:.4f}")
