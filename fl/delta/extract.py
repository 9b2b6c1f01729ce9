"""Structured subgraph extraction from the base model (XDELTA, Section 3.2: the sparsity optimization).

1. Extended network: every conv (and linear) layer l of the base's ``features`` stack gets K masked
   copies at candidate sparsity rates r_k (conv: 0.125k, k=1..7; linear: 0.2k, k=1..4). Copy k keeps
   the ``(1 - r_k)`` share of the layer's filters with the largest l2 norm (mask M_k). The layer's
   output is the |gamma|-weighted sum of its copies,
       y_l = sum_k |gamma_lk| * block_l(x; W * M_k).
   The copies share W, so this is the block's output times a per-channel scale
   ``s_l = sum_k |gamma_lk| M_k`` (one forward instead of K; the same function).
2. Only the gammas train (every base weight frozen, BatchNorm on batch statistics):
       L = lambda0 * CE + lambda1 * sum_l sum_k |gamma_lk| (alpha * G_lk + beta * H_lk)
   Two choices, measured on the shipped pair: BatchNorm normalizes with batch statistics (with
   the running ones, every layer's rescaled channels shift all later layers and the gated base
   starts at chance, CE 2.4 on 10 classes, so CE cannot steer the gammas); and |gamma| is
   normalized per layer (sum_k |gamma_lk| = 1) inside the forward and the cost, not only after
   training, so that the cost cannot just shrink every gamma at once (raw |gamma|: cost 3.0 ->
   0.15 in two epochs with CE at chance) and only the relative weights, from which the sparsity
   is read, are learned.
   with G_lk the memory-access cost (weights + input + output activations) and H_lk the MACs of
   copy k, both (1 - r_k) times the full layer's. The paper: lambda0=0.5, lambda1=1.0, alpha=1e-5,
   beta=1e-7.
3. Per layer: w_k = |gamma_lk| / sum_j |gamma_lj|, sparsity_l = sum_k w_k r_k; keep the
   ``round((1 - sparsity_l) C_l)`` filters of largest l2 norm.
4. Remove the other channels physically with torch-pruning (DependencyGraph: BatchNorm entries and
   the next layer's input slices go with them), then fine-tune the pruned base with CE.
5. Drop the last blocks until the DELTA (subgraph + SE + proj + resizer + adapter) fits the size
   budget, fold each kept block's BatchNorm into its conv, and order channels by the base filters'
   importance (l2 norm), so that narrower tiers are channel prefixes.

Only sequential conv stacks (VGG-style ``features``: conv [BN] [ReLU] [pool] ...) are supported.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from fl.delta.network import DeltaArch, DeltaNet, FusedDelta, delta_params
from fl.delta.pair import Recipe, train_classifier

log = logging.getLogger("fl.delta")

CONV_RATES = tuple(round(0.125 * k, 4) for k in range(1, 8))
LINEAR_RATES = tuple(round(0.2 * k, 4) for k in range(1, 5))


@dataclass(frozen=True)
class ExtractSettings:
    conv_rates: tuple[float, ...] = CONV_RATES
    linear_rates: tuple[float, ...] = LINEAR_RATES
    lambda0: float = 0.5
    lambda1: float = 0.3  # the paper: 1.0, which drives every layer of the shipped pair to the 0.875 maximum
    alpha: float = 1e-5
    beta: float = 1e-7
    epochs: int = 2  # of gamma training over the server split
    lr: float = 0.01  # Adam on the gammas
    batch_size: int = 64
    finetune: Recipe = Recipe(epochs=3, lr=0.01)
    budget: float = 0.05  # DELTA parameters <= budget * base parameters
    se_reduction: int = 4
    delta_dim: int = 32
    resizer_hidden: int = 64
    adapter: str = "linear"


@dataclass
class Block:
    """One layer of the base's ``features`` with what follows it up to the next layer."""

    layer: str  # module name inside the base, e.g. "features.0"
    norm: str | None
    act: str | None
    pool: bool
    rates: tuple[float, ...]
    channels: int = 0
    macs: int = 0
    memory: int = 0


@dataclass
class Extraction:
    blocks: list[Block]
    sparsity: list[float]
    weights: list[list[float]]  # normalized |gamma| per block
    kept: list[int]
    pruned_base: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)


def blocks_of(base: nn.Module) -> list[Block]:
    """The base's ``features`` as blocks (layer, norm, activation, pool)."""
    features = getattr(base, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ValueError("subgraph extraction needs a base whose `features` is an nn.Sequential conv stack")
    blocks: list[Block] = []
    for index, module in enumerate(features):
        name = f"features.{index}"
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.kernel_size != (3, 3)
                                                  or module.padding != (1, 1) or module.stride != (1, 1)):
                raise ValueError(f"{name}: only 3x3 convs with padding 1 and stride 1 are supported")
            rates = CONV_RATES if isinstance(module, nn.Conv2d) else LINEAR_RATES
            blocks.append(Block(name, None, None, False, rates))
        elif not blocks:
            raise ValueError(f"{name}: the conv stack must start with a conv, found {type(module).__name__}")
        elif isinstance(module, nn.BatchNorm2d) and blocks[-1].norm is None and blocks[-1].act is None:
            blocks[-1].norm = name
        elif isinstance(module, nn.ReLU) and blocks[-1].act is None:
            blocks[-1].act = name
        elif isinstance(module, nn.MaxPool2d) and not blocks[-1].pool and module.kernel_size in (2, (2, 2)):
            blocks[-1].pool = True
        else:
            raise ValueError(f"{name}: unsupported {type(module).__name__} in the conv stack (VGG-style only)")
    return blocks


def filter_norms(layer: nn.Module) -> Tensor:
    return layer.weight.detach().flatten(1).norm(dim=1)


def rate_masks(norms: Tensor, rates: tuple[float, ...]) -> Tensor:
    """[K, C] float masks: copy k keeps the ``C - round(r_k C)`` (at least 1) largest-norm filters."""
    order = torch.argsort(norms, descending=True, stable=True)
    masks = torch.zeros(len(rates), len(norms), device=norms.device)
    for k, rate in enumerate(rates):
        keep = max(1, len(norms) - round(rate * len(norms)))
        masks[k, order[:keep]] = 1.0
    return masks


def kept_count(channels: int, sparsity: float) -> int:
    return max(1, round((1.0 - sparsity) * channels))


def _costs(base: nn.Module, blocks: list[Block], example: Tensor) -> None:
    shapes: dict[str, tuple] = {}
    handles = [base.get_submodule(b.layer).register_forward_hook(
        lambda m, i, o, name=b.layer: shapes.__setitem__(name, (tuple(i[0].shape), tuple(o.shape))))
        for b in blocks]
    try:
        with torch.no_grad():
            base.eval()(example)
    finally:
        for h in handles:
            h.remove()
    for b in blocks:
        layer = base.get_submodule(b.layer)
        (_, *inp), (_, *out) = shapes[b.layer]
        b.channels = out[0]
        spatial = int(torch.tensor(out[1:]).prod()) if len(out) > 1 else 1
        b.macs = layer.weight.numel() * spatial
        b.memory = layer.weight.numel() + int(torch.tensor(inp).prod()) + int(torch.tensor(out).prod())


def learn_sparsity(base: nn.Module, x: Tensor, y: Tensor, settings: ExtractSettings, seed: int) -> Extraction:
    """Steps 1-3: train the gammas of the extended network, return the per-layer sparsity."""
    base = copy.deepcopy(base).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    blocks = blocks_of(base)
    _costs(base, blocks, x[:1])
    base.train()  # batch statistics in BatchNorm (a copy: the caller's running statistics stay)
    device = x.device  # the gammas, rates and masks live where the base and the images are
    rates = [torch.tensor(settings.conv_rates if b.rates == CONV_RATES else settings.linear_rates, device=device)
             for b in blocks]
    masks = [rate_masks(filter_norms(base.get_submodule(b.layer)), tuple(r.tolist())) for b, r in zip(blocks, rates)]
    gammas = nn.ParameterList([nn.Parameter(torch.full((len(r),), 1.0 / len(r), device=device)) for r in rates])
    cost = [settings.alpha * b.memory * (1 - r) + settings.beta * b.macs * (1 - r) for b, r in zip(blocks, rates)]

    def weights(i: int) -> torch.Tensor:  # |gamma| normalized per layer
        g = gammas[i].abs()
        return g / g.sum().clamp_min(1e-12)

    def gate(i: int):
        def hook(_module, _inputs, out):
            scale = (weights(i)[:, None] * masks[i]).sum(0)
            return out * scale.view(1, -1, *([1] * (out.dim() - 2)))
        return hook

    handles = [base.get_submodule(b.act or b.norm or b.layer).register_forward_hook(gate(i))
               for i, b in enumerate(blocks)]
    optimizer = torch.optim.Adam(gammas.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    try:
        for epoch in range(settings.epochs):
            order = torch.randperm(len(x), generator=generator)
            ce_sum = reg_sum = 0.0
            for i in range(0, len(x), settings.batch_size):
                batch = order[i:i + settings.batch_size]
                ce = F.cross_entropy(base(x[batch]), y[batch])
                reg = sum((weights(i) * c).sum() for i, c in enumerate(cost))
                loss = settings.lambda0 * ce + settings.lambda1 * reg
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ce_sum += ce.item() * len(batch)
                reg_sum += reg.item() * len(batch)
            history.append({"epoch": epoch + 1, "ce": ce_sum / len(x), "reg": reg_sum / len(x)})
            log.info("sparsity search epoch %d: CE %.4f, cost %.4f", epoch + 1, ce_sum / len(x), reg_sum / len(x))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        normalized = [weights(i) for i in range(len(gammas))]
    sparsity = [float((w * r).sum()) for w, r in zip(normalized, rates)]
    kept = [kept_count(b.channels, s) for b, s in zip(blocks, sparsity)]
    return Extraction(blocks, sparsity, [w.tolist() for w in normalized], kept, base, history)


def prune_base(base: nn.Module, extraction: Extraction, example: Tensor) -> nn.Module:
    """Step 4a: a copy of the base without the dropped filters (torch-pruning), filters kept by l2 norm."""
    pruned = copy.deepcopy(base).eval()
    for p in pruned.parameters():  # torch-pruning traces only layers whose parameters require grad
        p.requires_grad_(True)
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
    for block, keep in zip(extraction.blocks, extraction.kept):
        layer = pruned.get_submodule(block.layer)
        order = torch.argsort(filter_norms(layer), descending=True, stable=True)
        drop = sorted(order[keep:].tolist())
        if drop:
            pruner = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
            graph.get_pruning_group(layer, pruner, drop).prune()
    return pruned


def choose_depth(channels: list[int], pools: list[bool], make_arch, budget_params: float) -> int:
    """Step 5a: the most leading blocks whose DELTA fits ``budget_params`` (at least one)."""
    for depth in range(len(channels), 0, -1):
        if delta_params(make_arch(depth)) <= budget_params:
            return depth
    log.warning("even a one-block DELTA exceeds the size budget of %.0f parameters", budget_params)
    return 1


@torch.no_grad()
def fold_block(layer: nn.Conv2d, norm: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor]:
    """A conv followed by an eval-mode BatchNorm as one conv with bias: (weight, bias)."""
    weight = layer.weight.detach().clone()
    bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    if norm is not None:
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        weight = weight * scale[:, None, None, None]
        bias = (bias - norm.running_mean) * scale + norm.bias
    return weight, bias


def build_delta(pruned: nn.Module, blocks: list[Block], edge: nn.Module, edge_spec: tuple[str, tuple],
                base_classifier: nn.Linear, settings: ExtractSettings, example: Tensor, budget_params: float) -> tuple[FusedDelta, list[Tensor]]:
    """Step 5: truncate to the budget, fold BatchNorm, attach SE/proj/resizer/adapter and E.

    Returns the fused model (heads freshly initialized from torch's global generator) and the
    importance (l2 norm of each kept base filter) of every DELTA conv channel.
    """
    for b in blocks:
        if not isinstance(pruned.get_submodule(b.layer), nn.Conv2d):
            raise ValueError("the DELTA subgraph is built from conv blocks only")
    channels = [pruned.get_submodule(b.layer).out_channels for b in blocks]
    pools = [b.pool for b in blocks]
    with torch.no_grad():
        maps: list[Tensor] = []
        handle = edge.features.register_forward_hook(lambda m, i, o: maps.append(o))
        try:
            edge.eval().forward_features(example)
        finally:
            handle.remove()
    in_channels, image_size = example.shape[1], example.shape[-1]

    def make_arch(depth: int) -> DeltaArch:
        last = channels[depth - 1]
        return DeltaArch(num_classes=base_classifier.out_features, in_channels=in_channels, image_size=image_size,
                         convs=tuple(channels[:depth]), pools=tuple(pools[:depth]),
                         se_hidden=max(1, last // settings.se_reduction), delta_dim=settings.delta_dim,
                         resizer_hidden=settings.resizer_hidden, edge_pool_dim=maps[-1].shape[1],
                         edge_feat_dim=edge.classifier.in_features, feature_dim=base_classifier.in_features,
                         edge=edge_spec, adapter=settings.adapter)

    depth = choose_depth(channels, pools, make_arch, budget_params)
    arch = make_arch(depth)
    fused = FusedDelta(arch, edge=copy.deepcopy(edge)).to(example.device)  # initialized on the CPU, then moved
    importance = []
    for conv, b in zip(fused.delta.convs(), blocks[:depth]):
        layer = pruned.get_submodule(b.layer)
        weight, bias = fold_block(layer, pruned.get_submodule(b.norm) if b.norm else None)
        conv.weight.data.copy_(weight)
        conv.bias.data.copy_(bias)
        importance.append(filter_norms(layer))
    fused.classifier.load_state_dict(base_classifier.state_dict())
    return fused, importance


def finetune_pruned(pruned: nn.Module, x: Tensor, y: Tensor, recipe: Recipe, seed: int) -> None:
    """Step 4b: fine-tune the physically pruned base with cross-entropy."""
    if recipe.epochs > 0:
        train_classifier(pruned, x, y, recipe, seed, label="pruned base (fine-tune)")
    pruned.eval()


def summary(extraction: Extraction) -> list[dict[str, Any]]:
    return [{"layer": b.layer, "channels": b.channels, "sparsity": round(s, 4), "kept": k,
             "weights": [round(w, 4) for w in ws]}
            for b, s, k, ws in zip(extraction.blocks, extraction.sparsity, extraction.kept, extraction.weights)]


__all__ = ["ExtractSettings", "Extraction", "DeltaNet", "blocks_of", "build_delta", "choose_depth", "finetune_pruned",
           "fold_block", "learn_sparsity", "prune_base", "rate_masks", "summary"]
