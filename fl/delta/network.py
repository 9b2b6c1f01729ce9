"""The DELTA network and the fused edge+DELTA model (Wang and Nirjon, XDELTA, Section 3).

    delta_feat = proj(GAP(SE(subgraph(x))))              the DELTA branch, [B, d]
    edge_pool  = GAP(E.features(x))                      E's last feature map, pooled, [B, P]
    edge_feat  = E.forward_features(x)                   what enters E's own classifier, [B, D_E]
    R          = resizer(concat(edge_pool, delta_feat))  2-layer MLP to the base's feature size D_B
    A          = adapter(edge_feat)                      E's features adapted to D_B (linear, or identity
                                                         when D_E == D_B and ``adapter="identity"``)
    fused      = (R + A) / 2
    logits     = base_classifier(fused)

``subgraph`` is a prefix of the base's conv stack, pruned and with BatchNorm folded into the convs
(``fl.delta.extract``); SE is a squeeze-and-excitation block with a skip connection,
``x + x * sigmoid(fc2(relu(fc1(GAP(x)))))``. E and the base classifier are frozen; what trains is
the *DELTA*: subgraph, SE, proj, resizer and adapter.

The concat is stored as ``(edge_pool, delta_feat)`` rather than the paper's ``(delta_feat,
edge_pool)`` (a permutation of the resizer's input columns, the same function) so that every
trainable tensor of a narrower DELTA is a *prefix block* of the full one (HeteroFL-style slicing,
Diao et al., ICLR 2021). A width-``r`` tier keeps ``ceil(r * n)`` of every size ``n`` the DELTA
owns, so that what a client trains and sends falls with ``r**2``:

* the hidden sizes: conv channels, SE hidden units, d, resizer hidden units H;
* the fused coordinates: the resizer's and the adapter's outputs are the first ``k_B = ceil(r *
  D_B)`` of the base's D_B feature coordinates, and the tier's fused vector is zero on the others
  (a tier model equals the full model with the non-prefix coordinates zeroed, as in HeteroFL);
  the frozen base classifier reads the whole D_B vector, so the fused forward is defined for
  every tier;
* the adapter's input: the first ``k_E = ceil(r * D_E)`` of E's features.

What stays whole: image channels and P (E's pooled map, a small input of the resizer). The
fused coordinates keep the base's own order (they are the MSE target of the construction) and
E's features keep E's order (E is frozen and shared); the DELTA's own hidden units are ordered
by importance (``order_by_importance``) so that a prefix keeps the most important ones.
``DeltaArch.scaled(r)`` is a tier's architecture and ``tier_slice``/``tier_keep`` cut a full
state to it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl.compute import model_device
from fl.models._api import ZooModel

EDGE, DELTA, RESIZER, ADAPTER, CLASSIFIER = "edge", "delta", "resizer", "adapter", "classifier"
TRAINABLE = (DELTA, RESIZER, ADAPTER)  # state-dict prefixes of the DELTA (what clients train and send)
FROZEN = (EDGE, CLASSIFIER)  # E and the base classifier


@dataclass(frozen=True)
class DeltaArch:
    """Everything that fixes the fused model's shapes; JSON round-trips (it travels to clients)."""

    num_classes: int
    in_channels: int
    image_size: int
    convs: tuple[int, ...]  # output channels of each subgraph conv (3x3, padding 1, bias, ReLU)
    pools: tuple[bool, ...]  # a 2x2 max-pool (ceil mode) after conv i
    se_hidden: int  # SE bottleneck units
    delta_dim: int  # d: the DELTA feature size after the projection
    resizer_hidden: int  # H
    edge_pool_dim: int  # P: channels of E's last feature map
    edge_feat_dim: int  # D_E
    feature_dim: int  # D_B: the base classifier's input size
    edge: tuple[str, tuple[tuple[str, Any], ...]]  # E's zoo name and options
    adapter: str = "linear"  # "linear" or "identity" (needs D_E == D_B)
    width: float = 1.0  # the tier this architecture is cut to (1.0: the full DELTA)
    fused_dim: int = 0  # k_B: the fused coordinates a tier computes (0: all D_B)
    edge_in_dim: int = 0  # k_E: E's features a tier's adapter reads (0: all D_E)

    @property
    def out_dim(self) -> int:
        """The fused coordinates this architecture computes (the rest of D_B are zero)."""
        return self.fused_dim or self.feature_dim

    @property
    def edge_in(self) -> int:
        """E's features the adapter reads (a prefix of D_E)."""
        return self.edge_in_dim or self.edge_feat_dim

    def __post_init__(self):
        if len(self.convs) != len(self.pools) or not self.convs:
            raise ValueError(f"need one pool flag per conv and at least one conv, got {self.convs} / {self.pools}")
        if self.adapter not in ("linear", "identity"):
            raise ValueError(f"adapter must be 'linear' or 'identity', got {self.adapter!r}")
        if self.adapter == "identity" and self.edge_feat_dim != self.feature_dim:
            raise ValueError(f"an identity adapter needs D_E == D_B, got {self.edge_feat_dim} and {self.feature_dim}")
        if not (0 <= self.fused_dim <= self.feature_dim and 0 <= self.edge_in_dim <= self.edge_feat_dim):
            raise ValueError(f"a tier computes at most D_B = {self.feature_dim} fused coordinates from at most "
                             f"D_E = {self.edge_feat_dim} edge features, got {self.fused_dim} and {self.edge_in_dim}")

    def scaled(self, width: float) -> "DeltaArch":
        """The width-``width`` tier: ``ceil(width * n)`` of every size the DELTA owns (hidden sizes,
        fused coordinates, the adapter's edge features), of the full DELTA."""
        if self.width != 1.0:
            raise ValueError("scale the full architecture, not a tier")
        if not 0.0 < width <= 1.0:
            raise ValueError(f"tier width must be in (0, 1], got {width}")
        cut = lambda n: max(1, math.ceil(width * n - 1e-9))  # noqa: E731
        return replace(self, convs=tuple(cut(c) for c in self.convs), se_hidden=cut(self.se_hidden),
                       delta_dim=cut(self.delta_dim), resizer_hidden=cut(self.resizer_hidden), width=float(width),
                       fused_dim=cut(self.feature_dim), edge_in_dim=cut(self.edge_feat_dim))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DeltaArch":
        raw = json.loads(text)
        raw["convs"], raw["pools"] = tuple(raw["convs"]), tuple(bool(p) for p in raw["pools"])
        name, options = raw["edge"]
        raw["edge"] = (name, tuple((k, _tuple(v)) for k, v in options))
        return cls(**raw)


def random_arch(num_classes: int, in_channels: int = 3, image_size: int = 32, *,
                edge: tuple[str, tuple] = ("cnn_small", ()), feature_dim: int = 256) -> DeltaArch:
    """A small fused architecture without a pair (two convs, E = ``edge``), for tests and sketches."""
    from fl.models import get_model

    name, options = edge
    e = get_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **dict(options))
    with torch.no_grad():
        pool_dim = e.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
    return DeltaArch(num_classes=num_classes, in_channels=in_channels, image_size=image_size, convs=(16, 32),
                     pools=(True, True), se_hidden=8, delta_dim=16, resizer_hidden=32, edge_pool_dim=pool_dim,
                     edge_feat_dim=e.classifier.in_features, feature_dim=feature_dim, edge=(name, tuple(options)))


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


# -- modules -------------------------------------------------------------------------------------

class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018) with a skip connection: x + x * s(x)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x + x * s[:, :, None, None]


class DeltaNet(nn.Module):
    """subgraph (conv-ReLU[-pool] x L) -> SE with skip -> GAP -> linear to d."""

    def __init__(self, arch: DeltaArch):
        super().__init__()
        layers: list[nn.Module] = []
        previous = arch.in_channels
        for channels, pool in zip(arch.convs, arch.pools):
            layers += [nn.Conv2d(previous, channels, 3, padding=1), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            previous = channels
        self.features = nn.Sequential(*layers)
        self.se = SEBlock(previous, arch.se_hidden)
        self.proj = nn.Linear(previous, arch.delta_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.se(self.features(x)).mean(dim=(2, 3)))

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]


def make_resizer(arch: DeltaArch) -> nn.Sequential:
    return nn.Sequential(nn.Linear(arch.edge_pool_dim + arch.delta_dim, arch.resizer_hidden), nn.ReLU(inplace=True),
                         nn.Linear(arch.resizer_hidden, arch.out_dim))


def make_adapter(arch: DeltaArch) -> nn.Module:
    return nn.Linear(arch.edge_in, arch.out_dim) if arch.adapter == "linear" else nn.Identity()


def trainable_modules(arch: DeltaArch) -> nn.ModuleDict:
    """The DELTA alone (no E, no classifier), named as in ``FusedDelta``'s state dict."""
    return nn.ModuleDict({DELTA: DeltaNet(arch), RESIZER: make_resizer(arch), ADAPTER: make_adapter(arch)})


class Branches(NamedTuple):
    delta_feat: Tensor  # [B, d]
    edge_pool: Tensor  # [B, P]
    edge_feat: Tensor  # [B, D_E]
    delta_out: Tensor  # R = resizer(concat(edge_pool, delta_feat)), [B, k_B] (k_B = D_B at full width)
    edge_out: Tensor  # A = adapter(edge_feat[:, :k_E]), [B, k_B]
    fused: Tensor  # (R + A) / 2 on the first k_B coordinates, 0 on the others, [B, D_B]


class FusedDelta(ZooModel):
    """E + DELTA + the base classifier; a ``ZooModel`` whose ``forward_features`` is the fused vector.

    E keeps its own classifier (XDelta compares E's predictions with the fused ones); the fused
    forward does not use it (``unused_in_forward``).
    """

    unused_in_forward = ("edge.classifier.",)

    def __init__(self, arch: DeltaArch, edge: nn.Module | None = None):
        super().__init__()
        from fl.models import get_model

        self.arch = arch
        name, options = arch.edge
        self.edge = edge if edge is not None else get_model(
            name, num_classes=arch.num_classes, in_channels=arch.in_channels, image_size=arch.image_size,
            **dict(options))
        self.delta = DeltaNet(arch)
        self.resizer = make_resizer(arch)
        self.adapter = make_adapter(arch)
        self.classifier = nn.Linear(arch.feature_dim, arch.num_classes)

    def edge_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(GAP of E's last feature map, E's feature vector) from one pass through E."""
        maps: list[Tensor] = []
        handle = self.edge.features.register_forward_hook(lambda _m, _i, out: maps.append(out))
        try:
            edge_feat = self.edge.forward_features(x)
        finally:
            handle.remove()
        return maps[-1].mean(dim=(2, 3)), edge_feat

    def branches(self, x: Tensor, edge: tuple[Tensor, Tensor] | None = None) -> Branches:
        """Every intermediate of the fused forward; ``edge`` = precomputed ``edge_outputs(x)``."""
        edge_pool, edge_feat = self.edge_outputs(x) if edge is None else edge
        delta_feat = self.delta(x)
        return fuse(self, delta_feat, edge_pool, edge_feat)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.branches(x).fused

    def trainable_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in TRAINABLE}

    def frozen_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in FROZEN}

    def freeze(self, *, edge: bool = True) -> None:
        """requires_grad off for the base classifier (always) and E (unless it trains this round)."""
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        for p in self.edge.parameters():
            p.requires_grad_(not edge)


def fuse(model: FusedDelta, delta_feat: Tensor, edge_pool: Tensor, edge_feat: Tensor) -> Branches:
    """The fused vector from the DELTA's features and E's (whole) outputs; a tier reads the first
    k_E of E's features and fills the first k_B of the D_B coordinates."""
    arch = model.arch
    delta_out = model.resizer(torch.cat([edge_pool, delta_feat], dim=1))
    edge_out = model.adapter(edge_feat[:, :arch.edge_in] if arch.adapter == "linear" else edge_feat[:, :arch.out_dim])
    fused = (delta_out + edge_out) / 2
    if arch.out_dim < arch.feature_dim:
        fused = F.pad(fused, (0, arch.feature_dim - arch.out_dim))
    return Branches(delta_feat, edge_pool, edge_feat, delta_out, edge_out, fused)


# -- parameter and MAC counts ----------------------------------------------------------------------

def delta_params(arch: DeltaArch) -> int:
    """Parameters of the DELTA: subgraph, SE, proj, resizer and adapter."""
    return sum(p.numel() for p in trainable_modules(arch).parameters())


def delta_macs(arch: DeltaArch) -> int:
    """Multiply-accumulates of the DELTA on one image (convs, linears and the SE product)."""
    macs, side, previous = 0, arch.image_size, arch.in_channels
    for channels, pool in zip(arch.convs, arch.pools):
        macs += previous * channels * 9 * side * side + channels * side * side  # conv + bias
        side = -(-side // 2) if pool else side
        previous = channels
    macs += 2 * previous * arch.se_hidden + previous * side * side  # SE: fc1, fc2, rescale
    macs += previous * arch.delta_dim
    macs += (arch.edge_pool_dim + arch.delta_dim) * arch.resizer_hidden + arch.resizer_hidden * arch.out_dim
    if arch.adapter == "linear":
        macs += arch.edge_in * arch.out_dim
    return macs


# -- tiers: nested prefix blocks --------------------------------------------------------------------

def tier_shapes(arch: DeltaArch, width: float) -> dict[str, torch.Size]:
    """Shape of every trainable tensor of the width-``width`` tier, by ``FusedDelta`` state-dict name."""
    modules = trainable_modules(arch.scaled(width) if width != 1.0 else arch)
    return {k: v.shape for k, v in modules.state_dict().items()}


def tier_model(model: FusedDelta, width: float) -> FusedDelta:
    """The width-``width`` tier of ``model``: its trainable prefix blocks, sharing E and the classifier."""
    if width == 1.0:
        return model
    tier = FusedDelta(model.arch.scaled(width), edge=model.edge)
    tier.classifier = model.classifier
    tier.to(model_device(model))  # the new DELTA blocks where the shared parts are
    tier.load_state_dict({**tier_slice(model.state_dict(), tier_shapes(model.arch, width)),
                          **model.frozen_state()})
    return tier


def tier_slice(state: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """The prefix block ``t[:s0, :s1, ...]`` of each tensor named in ``shapes``."""
    out = {}
    for name, shape in shapes.items():
        t = state[name]
        if t.dim() != len(shape) or any(s > n for s, n in zip(shape, t.shape)):
            raise ValueError(f"{name!r}: a {tuple(shape)} block does not fit in a {tuple(t.shape)} tensor")
        out[name] = t[tuple(slice(0, s) for s in shape)]
    return out


def tier_keep(full_shapes: Mapping[str, torch.Size], shapes: Mapping[str, torch.Size]):
    """The channel-slice codec's ``Keep`` (prefix masks on dims 0 and 1) for a tier's blocks."""
    keep = {}
    for name, full in full_shapes.items():
        shape = shapes[name]
        if tuple(shape[2:]) != tuple(full[2:]):
            raise ValueError(f"{name!r}: tiers may only cut dims 0 and 1, got {tuple(shape)} of {tuple(full)}")
        keep[name] = tuple(torch.arange(full[d]) < shape[d] for d in range(min(len(full), 2)))
    return keep


# -- ordering channels by importance (a function-preserving permutation) ----------------------------

@torch.no_grad()
def order_by_importance(model: FusedDelta, conv_importance: list[Tensor] | None = None) -> FusedDelta:
    """Permute every sliced dimension of the DELTA, most important first, in place.

    Conv channels go by ``conv_importance`` (the base filters' l2 norms, from extraction) or, when
    absent, by the l2 norm of each filter; SE hidden units, DELTA features and resizer hidden units
    by the l2 norm of the weights producing them. The fused function is unchanged.
    """
    convs = model.delta.convs()
    for i, conv in enumerate(convs):
        score = conv_importance[i] if conv_importance is not None else conv.weight.flatten(1).norm(dim=1)
        order = torch.argsort(score, descending=True, stable=True)
        _permute_out(conv, order)
        following = convs[i + 1] if i + 1 < len(convs) else None
        if following is not None:
            following.weight.copy_(following.weight[:, order])
        else:  # the SE block and the projection read the last conv's channels
            se = model.delta.se
            se.fc1.weight.copy_(se.fc1.weight[:, order])
            _permute_out(se.fc2, order)
            model.delta.proj.weight.copy_(model.delta.proj.weight[:, order])
    se = model.delta.se
    order = torch.argsort(se.fc1.weight.norm(dim=1), descending=True, stable=True)
    _permute_out(se.fc1, order)
    se.fc2.weight.copy_(se.fc2.weight[:, order])
    proj, first, second = model.delta.proj, model.resizer[0], model.resizer[2]
    order = torch.argsort(proj.weight.norm(dim=1), descending=True, stable=True)
    _permute_out(proj, order)
    p = model.arch.edge_pool_dim
    first.weight[:, p:] = first.weight[:, p:][:, order]
    order = torch.argsort(first.weight.norm(dim=1), descending=True, stable=True)
    _permute_out(first, order)
    second.weight.copy_(second.weight[:, order])
    return model


def _permute_out(layer: nn.Module, order: Tensor) -> None:
    layer.weight.copy_(layer.weight[order])
    if layer.bias is not None:
        layer.bias.copy_(layer.bias[order])


# -- losses ------------------------------------------------------------------------------------------

def fnc_loss(delta_out: Tensor, edge_out: Tensor, eps: float = 1e-6) -> Tensor:
    """Feature-wise negative correlation (the XDELTA paper's eq. 8, negative correlation learning).

    For each feature j, the Pearson correlation over the batch between the DELTA branch R_j and
    E's adapted feature A_j; the loss is their mean, so minimizing it makes the DELTA represent
    what E does not. A is detached: E is frozen, only the DELTA moves. Bounded in [-1, 1], so it
    cannot run away from a cross-entropy or MSE term.
    """
    r = delta_out - delta_out.mean(dim=0, keepdim=True)
    a = (edge_out - edge_out.mean(dim=0, keepdim=True)).detach()
    corr = (r * a).sum(dim=0) / (r.norm(dim=0) * a.norm(dim=0) + eps)
    return corr.mean()


def group_lasso(delta: DeltaNet) -> Tensor:
    """Structured sparsity regularization: sum of l2 norms of every conv filter (output channel)
    and every input channel slice, over the DELTA's convs."""
    total = delta.proj.weight.new_zeros(())
    for conv in delta.convs():
        w = conv.weight
        total = total + w.flatten(1).norm(dim=1).sum() + w.transpose(0, 1).flatten(1).norm(dim=1).sum()
    return total


@dataclass(frozen=True)
class DeltaLossWeights:
    """Weights of the DELTA objective: ``mse * MSE + fnc * L_FNC + sr * group lasso``."""

    mse: float = 1.0
    fnc: float = 0.3  # below half of the MSE weight (the paper's guidance)
    sr: float = 1e-4  # much smaller


def delta_objective(parts: Branches, model: FusedDelta, target: Tensor, weights: DeltaLossWeights) -> tuple[Tensor, dict[str, float]]:
    """Centralized DELTA training: MSE(fused, base features) + FNC + group lasso."""
    mse = F.mse_loss(parts.fused, target)
    fnc = fnc_loss(parts.delta_out, parts.edge_out)
    sr = group_lasso(model.delta)
    loss = weights.mse * mse + weights.fnc * fnc + weights.sr * sr
    return loss, {"mse": mse.item(), "fnc": fnc.item(), "sr": sr.item()}
