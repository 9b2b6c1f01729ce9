"""Building a DELTA centrally from a pretrained (base, edge) pair, and the XDELTA report.

    1. subgraph extraction from the base (``fl.delta.extract``: learned sparsity over candidate
       rates, l2 masks, physical pruning, fine-tuning, truncation to the size budget, BN folding)
    2. DELTA training with E and B frozen (``train_delta``):
           MSE(fused, B's features) + lambda_FNC * L_FNC + lambda_SR * group lasso
    3. channels ordered by importance, so that width tiers are prefixes (``order_by_importance``)
    4. the report: base, edge and fused accuracy, the gain over E, P_D/E, F_D/E, P_D/B, F_D/B, the
       correlation between the DELTA and edge features on samples E gets wrong and B right, the
       accuracy of every width tier, and the knowledge-distillation baseline (E distilled from B);
       when the server split is of another distribution than the task's, the base, edge and fused
       accuracy on a held-out set of the server's own distribution too (``server_domain``).

Everything is cached under ``<pair dir>/delta-<hash of these settings>/``: ``fused.pt`` (the
FusedDelta state), ``arch.json`` and ``report.json``. Every step runs on the ``compute`` device
(``fl.compute``: the pair, the DELTA and the server split moved there once); the result is
returned and saved on the CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl.compute import CPU, model_device, resolve_compute
from fl.delta.extract import ExtractSettings, build_delta, finetune_pruned, learn_sparsity, prune_base, summary
from fl.delta.network import (Branches, DeltaArch, DeltaLossWeights, FusedDelta, delta_macs, delta_objective,
                              delta_params, fnc_loss, fuse, order_by_importance, tier_model, tier_shapes, tier_slice)
from fl.delta.pair import Pair, PairSpec, Recipe, _plain, accuracy, digest, \
    ensure_pair, predict, server_domain_test, server_split, shifted, tensors, train_classifier
from fl.errors import ConfigError
from fl.outputs import atomic_save, atomic_write_text
from fl.threads import central_threads

log = logging.getLogger("fl.delta")

DEFAULT_TIERS = (1.0, 1 / math.sqrt(2), 0.5, 1 / (2 * math.sqrt(2)))
# What a width tier cuts (``fl.delta.network``); part of the cache key, so that a DELTA trained for
# another tier layout (slimmable training trains the tiers themselves) is built anew.
TIER_LAYOUT = "hidden+fused+edge-in"


@dataclass(frozen=True)
class DeltaTrainSettings:
    epochs: int = 40
    lr: float = 2e-3  # Adam, cosine-annealed
    batch_size: int = 64
    mse: float = 1.0
    fnc: float = 0.05  # below half of the MSE weight, as the paper advises
    sr: float = 1e-4
    ce: float = 0.5  # not in the paper: + ce * CE(C_B(fused), y) on the server split's labels (0: the paper's loss)
    shift: int = 0  # not in the paper: random translation by up to this many pixels (0: none)
    views: int = 8  # with shift: translated copies of the server split whose B and E outputs are computed once
    slimmable: bool = False  # not in the paper: also train the narrowest and one random tier per batch


@dataclass(frozen=True)
class KDSettings:
    """The baseline: E fine-tuned from its pretrained weights with Hinton et al.'s distillation loss."""

    epochs: int = 10
    lr: float = 0.01
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the soft-target term; 1 - alpha on the labels
    shift: int = 0  # random translation, as for the DELTA (the teacher sees the same moved images)


@dataclass(frozen=True)
class ConstructionSpec:
    extract: ExtractSettings = ExtractSettings()
    train: DeltaTrainSettings = DeltaTrainSettings()
    kd: KDSettings | None = KDSettings()

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "ConstructionSpec":
        o = _plain(dict(options or {}))
        unknown = sorted(set(o) - {"extract", "train", "kd"})
        if unknown:
            raise ConfigError(f"model.construction.{unknown[0]}", "unknown option; allowed: extract, train, kd")
        try:
            extract = dict(o.get("extract") or {})
            if "finetune" in extract:
                extract["finetune"] = Recipe(**extract["finetune"])
            for key in ("conv_rates", "linear_rates"):
                if key in extract:
                    extract[key] = tuple(float(r) for r in extract[key])
            kd = o.get("kd", {})
            return cls(ExtractSettings(**extract), DeltaTrainSettings(**(o.get("train") or {})),
                       None if kd is None or kd is False else KDSettings(**kd))
        except TypeError as exc:
            raise ConfigError("model.construction", str(exc)) from None

    def key(self) -> dict[str, Any]:
        return {**asdict(self), "tier_layout": TIER_LAYOUT}


@dataclass
class Constructed:
    arch: DeltaArch
    state: dict[str, Tensor]
    report: dict[str, Any]
    directory: Path


# -- the cached pipeline ------------------------------------------------------------------------------

def ensure_delta(pair_spec: PairSpec, spec: ConstructionSpec, cache_dir: str, *, threads: int | None = None,
                 tiers: tuple[float, ...] = DEFAULT_TIERS, compute: str | torch.device = "auto") -> Constructed:
    """The DELTA of ``spec`` on the pair (its state on the CPU): loaded from the cache, or built on
    the ``compute`` device and cached."""
    pair = ensure_pair(pair_spec, cache_dir, threads=threads, compute=compute)
    directory = pair.directory / f"delta-{digest(spec.key())}"
    files = [directory / name for name in ("fused.pt", "arch.json", "report.json")]
    if all(f.exists() for f in files):
        log.info("using the cached DELTA in %s", directory)
        built = Constructed(DeltaArch.from_json(files[1].read_text()),
                            torch.load(files[0], map_location="cpu", weights_only=True),
                            json.loads(files[2].read_text()), directory)
        if "server_domain" not in built.report and pair_spec.server_difficulty is not None:  # built before it was
            fused = FusedDelta(built.arch)
            fused.load_state_dict(built.state)
            with central_threads(threads):
                built.report["server_domain"] = server_domain(pair.base, pair.edge, fused, pair_spec)
            atomic_write_text(files[2], json.dumps(built.report, indent=2))
        log_summary(built.report)
        return built
    directory.mkdir(parents=True, exist_ok=True)
    with central_threads(threads), torch.random.fork_rng():
        torch.manual_seed(pair_spec.seed)  # the build depends on its cache key, not on what ran before
        fused, report = construct(pair, pair_spec, spec, tiers, device=resolve_compute(compute))
    atomic_save(fused.state_dict(), files[0])  # construct returns it on the CPU
    atomic_write_text(files[1], fused.arch.to_json())
    atomic_write_text(files[2], json.dumps(report, indent=2))
    log.info("DELTA built and cached in %s", directory)
    log_summary(report)
    return Constructed(fused.arch, fused.state_dict(), report, directory)


def log_summary(report: Mapping[str, Any]) -> None:
    """The figures a user checks before federated training starts (XDELTA's Table 5 quantities)."""
    kd = report.get("kd_edge_accuracy")
    log.info("DELTA: base %.4f, edge %.4f, edge+DELTA (fused) %.4f, gap to the base %.2f points, KD baseline %s; "
             "DELTA %s parameters (P_D/B %.2f%%)", report["base_accuracy"], report["edge_accuracy"],
             report["fused_accuracy"], 100 * report["gap_to_base"], "-" if kd is None else f"{kd:.4f}",
             f"{report['params']['delta']:,}", 100 * report["P_D/B"])
    if "server_domain" in report:
        d = report["server_domain"]
        log.info("  on the server's own data (difficulty %s, %d held-out images): base %.4f, edge %.4f, fused %.4f, "
                 "gap to the base %.2f points", d["difficulty"], d["test_samples"], d["base_accuracy"],
                 d["edge_accuracy"], d["fused_accuracy"], 100 * d["gap_to_base"])
    for width, tier in report.get("tiers", {}).items():
        log.info("  tier width %s: fused accuracy %.4f, %s DELTA parameters", width, tier["accuracy"],
                 f"{tier['params']:,}")


def construct(pair: Pair, pair_spec: PairSpec, spec: ConstructionSpec, tiers: tuple[float, ...] = DEFAULT_TIERS, *,
              device: torch.device = CPU) -> tuple[FusedDelta, dict[str, Any]]:
    """Steps 1-4 on ``device`` (the pair's models are moved there); the fused model is returned on the CPU."""
    from fl.models import model_profile

    seed = pair_spec.seed
    train, test = server_split(pair_spec)
    x, y = tensors(train, device=device)
    x_test, y_test = tensors(test, device=device)
    base, edge = pair.base.to(device).eval(), pair.edge.to(device).eval()
    for p in list(base.parameters()) + list(edge.parameters()):
        p.requires_grad_(False)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    base_logits, edge_logits = predict(base, x_test), predict(edge, x_test)

    # 1. subgraph extraction
    extraction = learn_sparsity(base, x, y, spec.extract, seed)
    pruned = prune_base(base, extraction, x[:1])
    finetune_pruned(pruned, x, y, spec.extract.finetune, seed)
    pruned_accuracy = accuracy(predict(pruned, x_test), y_test)
    timings["extract_s"] = round(time.perf_counter() - started, 1)
    base_profile = model_profile(base, train.channels, train.image_size)
    edge_profile = model_profile(edge, train.channels, train.image_size)
    torch.manual_seed(seed)
    edge_name = str(pair_spec.edge["name"])
    edge_options = tuple(sorted((k, v) for k, v in pair_spec.edge.items() if k != "name"))
    fused, importance = build_delta(pruned, extraction.blocks, edge, (edge_name, edge_options), base.classifier,
                                    spec.extract, x[:1], spec.extract.budget * base_profile["params"])

    # 2. DELTA training with E and B frozen; 3. importance order (tiers are prefixes). Slimmable
    # training trains the prefixes themselves, so their order is fixed first (convs by the base
    # filters' importance); otherwise the trained units are ordered afterwards.
    if spec.train.slimmable:
        order_by_importance(fused, importance)
    started = time.perf_counter()
    history = train_delta(fused, base, x, y, spec.train, seed, tiers)
    timings["train_s"] = round(time.perf_counter() - started, 1)
    if not spec.train.slimmable:
        order_by_importance(fused, importance)

    # 4. the report
    fused_parts = fused_outputs(fused, x_test)
    fused_logits = fused.classifier(fused_parts["fused"])
    arch = fused.arch
    p_delta, f_delta = delta_params(arch), delta_macs(arch)
    report: dict[str, Any] = {
        "server_samples": len(x), "test_samples": len(x_test),
        "base_accuracy": accuracy(base_logits, y_test),
        "edge_accuracy": accuracy(edge_logits, y_test),
        "fused_accuracy": accuracy(fused_logits, y_test),
        "pruned_base_accuracy": pruned_accuracy,
        "params": {"delta": p_delta, "edge": edge_profile["params"], "base": base_profile["params"],
                   "delta_parts": part_params(fused)},
        "macs": {"delta": f_delta, "edge": edge_profile["macs"], "base": base_profile["macs"]},
        "P_D/E": p_delta / edge_profile["params"], "F_D/E": f_delta / edge_profile["macs"],
        "P_D/B": p_delta / base_profile["params"], "F_D/B": f_delta / base_profile["macs"],
        "arch": json.loads(arch.to_json()),
        "extraction": summary(extraction), "extraction_history": extraction.history,
        "train_history": history, "timings": timings,
    }
    report["gain_over_edge"] = report["fused_accuracy"] - report["edge_accuracy"]
    report["gap_to_base"] = report["base_accuracy"] - report["fused_accuracy"]
    report["correlation"] = correlation_scores(fused_parts, edge_logits, base_logits, y_test)
    report["tiers"] = {f"{w:.4f}": {"accuracy": accuracy(predict(tier_model(fused, w), x_test), y_test),
                                    "params": delta_params(arch.scaled(w) if w != 1.0 else arch)} for w in tiers}
    if pair_spec.server_difficulty is not None:
        report["server_domain"] = server_domain(base, edge, fused, pair_spec)
    if spec.kd is not None:
        started = time.perf_counter()
        report["kd_edge_accuracy"] = accuracy(predict(distill(edge, base, x, y, spec.kd, seed), x_test), y_test)
        timings["kd_s"] = round(time.perf_counter() - started, 1)
    return fused.to(CPU), report


@torch.no_grad()
def server_domain(base: nn.Module, edge: nn.Module, fused: FusedDelta, pair_spec: PairSpec) -> dict[str, Any]:
    """Base, edge and fused (edge + DELTA) accuracy and the fused model's gap to the base on a held-out
    set of the server split's own distribution (``fl.delta.pair.server_domain_test``): how much of
    the base's accuracy the DELTA recovers on the data it was built from (XDELTA's Table 5), apart
    from how well that data transfers to the task's."""
    test = server_domain_test(pair_spec)
    x, y = tensors(test, device=model_device(fused))
    acc = {role: accuracy(predict(model.eval(), x), y) for role, model in (("base", base), ("edge", edge),
                                                                           ("fused", fused))}
    return {"difficulty": test.difficulty, "test_samples": len(x), "base_accuracy": acc["base"],
            "edge_accuracy": acc["edge"], "fused_accuracy": acc["fused"], "gap_to_base": acc["base"] - acc["fused"]}


# -- DELTA training --------------------------------------------------------------------------------------

@torch.no_grad()
def fused_outputs(fused: FusedDelta, x: Tensor, batch_size: int = 500) -> dict[str, Tensor]:
    fused.eval()
    parts = [fused.branches(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return {name: torch.cat([getattr(p, name) for p in parts]) for name in parts[0]._fields}


def train_delta(fused: FusedDelta, base: nn.Module, x: Tensor, y: Tensor, settings: DeltaTrainSettings,
                seed: int, tiers: tuple[float, ...] = DEFAULT_TIERS) -> list[dict]:
    """Adam on the DELTA (subgraph, SE, proj, resizer, adapter) with E and B frozen. B's features
    and E's outputs are computed once, on the server split or, with ``shift``, on ``views``
    randomly translated copies of it; each sample of a batch is then drawn from one of its copies.
    (Computing them afresh for every batch took 370 s against 194 s for 8 copies, 60 epochs, on the shipped
    pair, measured: B's forward pass costs about 20 times the DELTA's MACs.)

    ``slimmable``: the sandwich rule of slimmable networks (Yu and Huang, "Universally Slimmable
    Networks and Improved Training Techniques", ICCV 2019) over the DELTA's nested tiers: each
    batch adds the loss of the narrowest tier and of one other tier drawn at random, each computed
    through prefix views of the full weights, so that every tier is a working DELTA and not only
    the full one (the FL clients of the smaller tiers start from these prefixes)."""
    fused.freeze(edge=True)
    base.eval()
    fused.edge.eval()

    @torch.no_grad()
    def frozen_outputs(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pool, feat = fused.edge_outputs(images)
        return base.forward_features(images), pool, feat

    generator = torch.Generator().manual_seed(seed)
    copies = max(settings.views, 1) if settings.shift else 1
    offsets = torch.randint(0, 2 * settings.shift + 1, (copies, len(x), 2), generator=generator)

    def view(copy: Tensor, index: Tensor) -> Tensor:
        return shifted(x[index], offsets[copy, index], settings.shift) if settings.shift else x[index]

    outs = [[frozen_outputs(view(torch.full((len(i),), c), i)) for i in torch.arange(len(x)).split(500)]
            for c in range(copies)]
    target, edge_pool, edge_feat = (torch.stack([torch.cat([o[k] for o in per_copy]) for per_copy in outs])
                                    for k in range(3))
    weights = DeltaLossWeights(settings.mse, settings.fnc, settings.sr)
    narrow = sorted(w for w in set(tiers) if w != 1.0) if settings.slimmable else []
    slim = {w: TierBranches(fused, w) for w in narrow}
    params = [p for name, p in fused.named_parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    steps = settings.epochs * ((len(x) + settings.batch_size - 1) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    history = []
    for epoch in range(settings.epochs):
        fused.train()
        order = torch.randperm(len(x), generator=generator)
        sums: dict[str, float] = {}
        for i in range(0, len(x), settings.batch_size):
            batch = order[i:i + settings.batch_size]
            copy = torch.randint(copies, (len(batch),), generator=generator)
            images = view(copy, batch)
            batch_target, pool, feat = target[copy, batch], edge_pool[copy, batch], edge_feat[copy, batch]
            parts = fuse(fused, fused.delta(images), pool, feat)
            loss, terms = delta_objective(parts, fused, batch_target, weights)
            if settings.ce:
                ce = F.cross_entropy(fused.classifier(parts.fused), y[batch])
                loss = loss + settings.ce * ce
                terms["ce"] = ce.item()
            if narrow:
                others = narrow[1:]
                drawn = [narrow[0]] + ([others[int(torch.randint(len(others), (1,), generator=generator))]]
                                       if others else [])
                for w in drawn:  # the tier's MSE + FNC (+ CE); the group lasso stays on the full width
                    tier_parts = slim[w](images, pool, feat)
                    tier_mse = F.mse_loss(tier_parts.fused, batch_target)
                    tier_loss = settings.mse * tier_mse + settings.fnc * fnc_loss(tier_parts.delta_out,
                                                                                  tier_parts.edge_out)
                    if settings.ce:
                        tier_loss = tier_loss + settings.ce * F.cross_entropy(fused.classifier(tier_parts.fused),
                                                                              y[batch])
                    loss = loss + tier_loss
                    terms["tier_mse"] = terms.get("tier_mse", 0.0) + tier_mse.item() / len(drawn)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            for k, v in {"loss": loss.item(), **terms}.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch)
        history.append({"epoch": epoch + 1, **{k: v / len(x) for k, v in sums.items()}})
        if (epoch + 1) % 5 == 0 or epoch + 1 == settings.epochs:
            log.info("  DELTA epoch %d/%d: %s", epoch + 1, settings.epochs, ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()
                                                                if k != "epoch"))
    fused.eval()
    return history


class TierBranches:
    """The width-``width`` tier's fused forward computed through prefix views of ``full``'s DELTA
    weights (``torch.func.functional_call``), so its gradients land in the full model's blocks."""

    def __init__(self, full: FusedDelta, width: float):
        self.full, self.shapes = full, tier_shapes(full.arch, width)
        tier = FusedDelta(full.arch.scaled(width), edge=full.edge)
        tier.classifier = full.classifier
        self.module = _FuseFromEdge(tier).to(model_device(full))

    def __call__(self, x: Tensor, edge_pool: Tensor, edge_feat: Tensor) -> Branches:
        views = tier_slice(dict(self.full.named_parameters()), self.shapes)
        return torch.func.functional_call(self.module, {f"tier.{k}": v for k, v in views.items()},
                                          (x, edge_pool, edge_feat), strict=False)


class _FuseFromEdge(nn.Module):
    def __init__(self, tier: FusedDelta):
        super().__init__()
        self.tier = tier

    def forward(self, x: Tensor, edge_pool: Tensor, edge_feat: Tensor) -> Branches:
        return fuse(self.tier, self.tier.delta(x), edge_pool, edge_feat)


def distill(edge: nn.Module, base: nn.Module, x: Tensor, y: Tensor, kd: KDSettings, seed: int) -> nn.Module:
    """E fine-tuned on the server split with alpha * T^2 KL(p_B^T || p_E^T) + (1 - alpha) CE, the
    teacher's logits taken on the same batch: computed once for the whole split without ``shift``,
    per translated batch with it."""
    student = copy.deepcopy(edge)
    for p in student.parameters():
        p.requires_grad_(True)
    fixed = None if kd.shift else predict(base, x)
    base.eval()
    t = kd.temperature

    def loss_fn(logits: Tensor, images: Tensor, index: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            teacher = base(images) if fixed is None else fixed[index]
        soft = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher / t, 1), reduction="batchmean")
        return kd.alpha * t * t * soft + (1 - kd.alpha) * F.cross_entropy(logits, labels)

    train_classifier(student, x, y, Recipe(epochs=kd.epochs, lr=kd.lr, shift=kd.shift), seed, loss_fn=loss_fn,
                     label="KD student (edge distilled from base)")
    return student.eval()


# -- report helpers -----------------------------------------------------------------------------------------

def part_params(fused: FusedDelta) -> dict[str, int]:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"subgraph": count(fused.delta.features), "se": count(fused.delta.se), "proj": count(fused.delta.proj),
            "resizer": count(fused.resizer), "adapter": count(fused.adapter)}


def correlation_scores(parts: Mapping[str, Tensor], edge_logits: Tensor, base_logits: Tensor,
                       y: Tensor) -> dict[str, float]:
    """Correlation between the DELTA branch R and E's adapted features A on the test samples that E
    gets wrong and B right: feature-wise (each feature's Pearson correlation across those samples,
    averaged over features; the quantity L_FNC minimizes) and sample-wise (each sample's Pearson
    correlation across features, averaged over samples). Both over all test samples as well."""
    subset = (edge_logits.argmax(1) != y) & (base_logits.argmax(1) == y)
    out = {"edge_wrong_base_right": int(subset.sum())}
    for name, rows in (("subset", subset), ("all", torch.ones_like(subset))):
        if int(rows.sum()) < 2:
            continue
        r, a = parts["delta_out"][rows], parts["edge_out"][rows]
        out[f"feature_wise_{name}"] = float(_pearson(r, a, dim=0).mean())
        out[f"sample_wise_{name}"] = float(_pearson(r, a, dim=1).mean())
    return out


def _pearson(r: Tensor, a: Tensor, dim: int) -> Tensor:
    r = r - r.mean(dim=dim, keepdim=True)
    a = a - a.mean(dim=dim, keepdim=True)
    return (r * a).sum(dim=dim) / (r.norm(dim=dim) * a.norm(dim=dim)).clamp_min(1e-12)


__all__ = ["ConstructionSpec", "Constructed", "DeltaTrainSettings", "KDSettings", "construct", "correlation_scores",
           "distill", "ensure_delta", "train_delta", "DEFAULT_TIERS"]
