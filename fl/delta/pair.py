"""The edge/base pair DELTA starts from: trained centrally on a server-side split, cached by hash.

DELTA needs a trained base B and a trained edge model E. They are trained here, on data the
clients never see: for ``synthetic`` a separate stream of the run's seed (``stream=2``; the
clients' training set is stream 0, the test set stream 1), so the server split is disjoint from
every client's data and from the test set by construction. For other datasets the server split is
a seeded subset of the training images (the federation partitions all of them, so it overlaps the
clients' data; logged as a warning).

The recipe is ``bench/capacity_gap.py``'s: SGD with momentum 0.9, weight decay 5e-4, a one-cycle
learning rate, batch 64, no augmentation. Results are cached under
``<cache_dir>/pair-<hash>/{base,edge}.pt`` where the hash covers everything that determines them
(models, recipe, dataset options, seed, split size, and a fingerprint of the first rendered server
images, so a changed renderer never reuses stale weights): a rerun loads them in milliseconds.
Training runs on the run's compute device (``compute``, ``fl.compute``: data and models moved
there once); the cached weights are saved from the CPU and load on any machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl.compute import CPU, resolve_compute
from fl.errors import ConfigError
from fl.outputs import atomic_save, atomic_write_text
from fl.threads import central_threads

log = logging.getLogger("fl.delta")

SERVER_STREAM = 2  # synthetic stream of the server split (0: clients' training set, 1: test set)
_SUBSET_TAG = 0x5E12  # seed word of the server subset for non-synthetic datasets


@dataclass(frozen=True)
class Recipe:
    """Central training: SGD momentum 0.9, weight decay 5e-4, one-cycle lr (bench/capacity_gap.py)."""

    epochs: int = 20
    lr: float = 0.05
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    shift: int = 0  # random translation of every batch by up to this many pixels (0: none)


@dataclass(frozen=True)
class PairSpec:
    """What determines the pretrained pair (and so its cache key)."""

    data: Mapping[str, Any]  # the run's data config: name, dataset options (partition ignored)
    seed: int
    server_samples: int = 5000
    base: Mapping[str, Any] = field(default_factory=lambda: {"name": "vgg11", "width": 0.5})
    edge: Mapping[str, Any] = field(default_factory=lambda: {"name": "cnn_small"})
    base_recipe: Recipe = Recipe(epochs=20, lr=0.05)
    edge_recipe: Recipe = Recipe(epochs=20, lr=0.02)
    server_difficulty: float | None = None  # synthetic: the server split's difficulty (None: the run's)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], prefix: str = "model.pair") -> "PairSpec":
        """The spec of ``options``; a bad one is a ConfigError naming ``prefix.<key>`` (the config
        key it came from: ``model.pair`` or ``plugins.xdelta.pair``)."""
        o = dict(options)
        known = {"data", "seed", "server_samples", "base", "edge", "base_recipe", "edge_recipe", "server_difficulty"}
        unknown = sorted(set(o) - known)
        if unknown:
            raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown option; allowed: {', '.join(sorted(known))}")
        if "data" not in o or "seed" not in o:
            raise ConfigError(prefix, "needs data (the run's data config) and seed")
        for key in ("base_recipe", "edge_recipe"):
            if key in o:
                try:
                    o[key] = Recipe(**dict(o[key]))
                except TypeError as exc:
                    raise ConfigError(f"{prefix}.{key}", f"{exc}; a recipe takes: "
                                                         f"{', '.join(f.name for f in fields(Recipe))}") from None
        o["data"], o["base"], o["edge"] = _plain(o["data"]), _plain(o.get("base", cls.base_default())), \
            _plain(o.get("edge", {"name": "cnn_small"}))
        spec = cls(**o)
        if spec.server_samples < 1:
            raise ConfigError(f"{prefix}.server_samples", f"must be >= 1, got {spec.server_samples}")
        if spec.server_difficulty is not None and (spec.data.get("name") != "synthetic"
                                                   or not _in_unit_interval(spec.server_difficulty)):
            raise ConfigError(f"{prefix}.server_difficulty",
                              f"a difficulty in [0, 1] for synthetic data, or null (data={spec.data.get('name')}: "
                              f"add {prefix}.server_difficulty=null); got {spec.server_difficulty!r}")
        return spec

    @staticmethod
    def base_default() -> dict[str, Any]:
        return {"name": "vgg11", "width": 0.5}

    def dataset_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in ("name", "root", "partition")}

    def key(self) -> dict[str, Any]:
        return {"data": {k: v for k, v in self.data.items() if k != "partition"}, "seed": self.seed,
                "server_samples": self.server_samples, "base": dict(self.base), "edge": dict(self.edge),
                "base_recipe": asdict(self.base_recipe), "edge_recipe": asdict(self.edge_recipe),
                **({} if self.server_difficulty is None else {"server_difficulty": float(self.server_difficulty)})}


def _in_unit_interval(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0


def _plain(value: Any) -> Any:
    """Frozen option tuples (fl.specs.freeze) or mappings -> plain dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                                                  for v in value):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- data ---------------------------------------------------------------------------------------------

def server_split(pair: PairSpec):
    """(server training set, test set) as ImageSets: disjoint from the clients' data for synthetic."""
    from fl.data import DATASETS

    name = str(pair.data["name"])
    options = pair.dataset_options()
    if name == "synthetic":
        from fl.data.synthetic import SyntheticImageSet, synthetic

        _, test = synthetic(num_clients=1, seed=pair.seed, **{**options, "samples_per_client": 1})
        keep = {k: v for k, v in options.items() if k in ("difficulty", "num_classes")}
        if pair.server_difficulty is not None:  # public data of another difficulty than the clients' task
            keep["difficulty"] = float(pair.server_difficulty)
        train = SyntheticImageSet(pair.server_samples, pair.seed, stream=SERVER_STREAM, name="synthetic/server", **keep)
        return train, test
    train, test = DATASETS.get(name)(num_clients=1, seed=pair.seed, root=pair.data.get("root"), **options)
    n = min(pair.server_samples, len(train))
    log.warning("%s has no server stream: the server split is a seeded subset of %d training images, which the "
                "federation also gives to clients", name, n)
    index = np.sort(np.random.default_rng([pair.seed, _SUBSET_TAG]).permutation(len(train))[:n])
    return train.subset(index, name=f"{name}/server"), test


def server_domain_test(pair: PairSpec):
    """A held-out test set of the server split's own distribution when it is not the task's
    (synthetic with ``server_difficulty``: the task's test scenes rendered at the server's
    difficulty, disjoint from the server split by stream), else None. The XDELTA paper builds and
    tests a DELTA on one dataset, so its Table 5 quantities are measured there."""
    if pair.server_difficulty is None:
        return None
    from fl.data.synthetic import synthetic

    options = {**pair.dataset_options(), "samples_per_client": 1, "difficulty": float(pair.server_difficulty)}
    return synthetic(num_clients=1, seed=pair.seed, **options)[1]


def tensors(images, limit: int | None = None, device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` (all) images and labels, on ``device``."""
    n = len(images) if limit is None else min(limit, len(images))
    x, y = images.get(np.arange(n))
    return x.to(device), y.to(device)


# -- training ------------------------------------------------------------------------------------------

def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seed: int,
                     loss_fn=None, *, label: str = "model", after_step=None) -> None:
    """``bench/capacity_gap.py``'s recipe; ``loss_fn(logits, images, index, y)`` replaces CE (KD):
    ``images`` is the batch as the model saw it (translated with ``recipe.shift``), ``index`` its
    rows of ``x``. ``label`` names the model in the epoch lines of the log; ``after_step()`` runs
    after every optimizer step (e.g. to hold pruned weights at zero)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * ((len(x) + recipe.batch_size - 1) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=max(steps, 1),
                                                   pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), recipe.batch_size):
            batch = order[i:i + recipe.batch_size]
            images = translate(x[batch], recipe.shift, generator) if recipe.shift else x[batch]
            logits = model(images)
            loss = F.cross_entropy(logits, y[batch]) if loss_fn is None else loss_fn(logits, images, batch, y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            schedule.step()
            total += loss.item() * len(batch)
        if (epoch + 1) % 5 == 0 or epoch + 1 == recipe.epochs:
            log.info("  %s epoch %d/%d: training loss %.4f", label, epoch + 1, recipe.epochs, total / len(x))


def translate(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random (dx, dy) in [-shift, shift], edges replicated. Objects may
    sit anywhere in a synthetic scene, so a translated image keeps its label (a flip would not: it
    swaps left_eye and right_eye)."""
    return shifted(images, torch.randint(0, 2 * shift + 1, (len(images), 2), generator=generator), shift)


def shifted(images: torch.Tensor, offsets: torch.Tensor, shift: int) -> torch.Tensor:
    """Image k cropped at ``offsets[k] = (dy, dx)`` from its ``shift``-pixel replicate padding."""
    _, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    return torch.stack([padded[k, :, dy:dy + h, dx:dx + w] for k, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


# -- the cached pair -------------------------------------------------------------------------------------

@dataclass
class Pair:
    base: nn.Module
    edge: nn.Module
    directory: Path
    report: dict[str, Any]


def build_member(spec: Mapping[str, Any], *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from fl.models import get_model

    options = {k: v for k, v in spec.items() if k != "name"}
    return get_model(str(spec["name"]), num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                     **options)


def pair_directory(pair: PairSpec, cache_dir: str | os.PathLike) -> Path:
    train, _ = server_split(pair)
    fingerprint = hashlib.sha256(train.pixels(np.arange(min(8, len(train)))).numpy().tobytes()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"pair-{digest({**pair.key(), 'fingerprint': fingerprint})}"


def ensure_pair(pair: PairSpec, cache_dir: str | os.PathLike, *, threads: int | None = None,
                compute: str | torch.device = "auto") -> Pair:
    """The pretrained (base, edge), on the CPU: loaded from the cache, or trained on the server
    split on the ``compute`` device and cached."""
    directory = pair_directory(pair, cache_dir)
    train, test = server_split(pair)
    shape = dict(num_classes=train.num_classes, in_channels=train.channels, image_size=train.image_size)
    models = {role: build_member(spec, **shape) for role, spec in (("base", pair.base), ("edge", pair.edge))}
    report_path = directory / "pair.json"
    if report_path.exists() and all((directory / f"{role}.pt").exists() for role in models):
        for role, model in models.items():
            model.load_state_dict(torch.load(directory / f"{role}.pt", map_location="cpu", weights_only=True))
            model.eval()
        report = json.loads(report_path.read_text())
        log.info("using the cached pair in %s (base %.4f, edge %.4f test accuracy)", directory,
                 report["base"]["test_accuracy"], report["edge"]["test_accuracy"])
        return Pair(models["base"], models["edge"], directory, report)
    directory.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"spec": pair.key(), "server_samples": len(train), "test_samples": len(test)}
    device = resolve_compute(compute)
    with central_threads(threads), torch.random.fork_rng():
        x, y = tensors(train, device=device)
        x_test, y_test = tensors(test, device=device)
        for role, model in models.items():
            recipe = pair.base_recipe if role == "base" else pair.edge_recipe
            torch.manual_seed(pair.seed)
            reinit = build_member(pair.base if role == "base" else pair.edge, **shape)  # seeded initialization
            model.load_state_dict(reinit.state_dict())
            model.to(device)
            started = time.perf_counter()
            log.info("training the %s (%s) on %d server images for %d epochs", role, dict(pair.base if role == "base"
                     else pair.edge), len(x), recipe.epochs)
            train_classifier(model, x, y, recipe, pair.seed, label=role)
            model.eval()
            report[role] = {"test_accuracy": accuracy(predict(model, x_test), y_test),
                            "seconds": round(time.perf_counter() - started, 1)}
            log.info("%s: test accuracy %.4f (%.0f s)", role, report[role]["test_accuracy"], report[role]["seconds"])
            atomic_save(model.to(CPU).state_dict(), directory / f"{role}.pt")
    atomic_write_text(report_path, json.dumps(report, indent=2))
    return Pair(models["base"], models["edge"], directory, report)



