"""What travels in a DELTA-factorized round, shared by the server (strategies/delta.py) and the client
(clients/delta_trainer.py). Everything goes through the channel-slice codec (``fl.payload``):

    download to a width-w client:  [E + base classifier, only when the client lacks this version]
                                   + the DELTA's width-w prefix blocks
    upload from it:                the DELTA's width-w prefix blocks [+ E, on edge-training rounds]

The codec's reference (names, order, full shapes) is the full fused model's state restricted to
those names, so both sides cut and read the same layout; the frozen part and E travel with full
channel masks, the DELTA with prefix masks (``fl.delta.network.tier_keep``).
"""

from __future__ import annotations

import functools
import threading
from typing import Mapping

import torch
from torch import Tensor

from fl.delta.network import FROZEN, TRAINABLE, DeltaArch, FusedDelta, tier_keep, tier_shapes
from fl.payload import Keep, full_keep

# Config keys (server -> client)
ARCH = "delta.arch"  # the full DELTA architecture (DeltaArch JSON)
DELTA_TIER = "delta-tier"  # node config key of a deployed device's tier, and the number it reports with its partition
WIDTH = "delta.width"  # the client's tier width
WITH_FROZEN = "delta.with-frozen"  # the download carries E + the base classifier
FROZEN_VERSION = "delta.frozen-version"  # which version of E + classifier the client must hold
TRAIN_EDGE = "delta.train-edge"  # train E too this round and upload it
FNC_WEIGHT = "delta.fnc"
SR_WEIGHT = "delta.sr"
VAL_FRACTION = "delta.val-fraction"
# Keys in the client's persistent state (Flower Context.state)
FROZEN_STATE = "delta.frozen"
FROZEN_META = "delta.frozen-meta"


def is_trainable(name: str) -> bool:
    return name.split(".")[0] in TRAINABLE


def is_frozen(name: str) -> bool:
    return name.split(".")[0] in FROZEN


def is_edge(name: str) -> bool:
    return name.split(".")[0] == "edge"


_templates: dict[str, dict[str, Tensor]] = {}
_lock = threading.Lock()


def template_state(arch_json: str) -> dict[str, Tensor]:
    """A full fused model's state (shapes and dtypes; values are an initialization), per process."""
    with _lock:
        if arch_json not in _templates:
            with torch.random.fork_rng():
                _templates[arch_json] = {k: v.detach() for k, v in FusedDelta(DeltaArch.from_json(arch_json))
                                         .state_dict().items()}
        return _templates[arch_json]


@functools.lru_cache(maxsize=64)
def _tier_shapes(arch_json: str, width: float) -> dict[str, torch.Size]:
    return tier_shapes(DeltaArch.from_json(arch_json), width)


def download_layout(full: Mapping[str, Tensor], arch_json: str, width: float, with_frozen: bool) -> tuple[dict, Keep]:
    """(reference, keep) of a download: the frozen part whole (if sent), the DELTA cut to ``width``."""
    names = [n for n in full if (with_frozen and is_frozen(n)) or is_trainable(n)]
    return _layout(full, names, arch_json, width)


def upload_layout(full: Mapping[str, Tensor], arch_json: str, width: float, with_edge: bool) -> tuple[dict, Keep]:
    """(reference, keep) of an upload: the DELTA cut to ``width`` (+ E whole on edge rounds)."""
    names = [n for n in full if (with_edge and is_edge(n)) or is_trainable(n)]
    return _layout(full, names, arch_json, width)


def _layout(full: Mapping[str, Tensor], names: list[str], arch_json: str, width: float) -> tuple[dict, Keep]:
    reference = {n: full[n] for n in names}
    shapes = _tier_shapes(arch_json, float(width))
    trainable = [n for n in names if is_trainable(n)]
    keep = {**full_keep({n: full[n] for n in names if not is_trainable(n)}),
            **tier_keep({n: full[n].shape for n in trainable}, {n: shapes[n] for n in trainable})}
    return reference, {n: keep[n] for n in names}


def blocks_for(state: Mapping[str, Tensor], reference: Mapping[str, Tensor], keep: Keep) -> dict[str, Tensor]:
    """Each reference tensor's kept block, cut from ``state`` (prefix masks: a plain slice)."""
    out = {}
    for name in reference:
        sizes = [int(m.sum()) for m in keep[name]]
        t = state[name]
        out[name] = t[tuple(slice(0, s) for s in sizes)] if sizes else t
    return out


def upload_sizes(state: Mapping[str, Tensor], arch_json: str, widths, codec) -> dict[float, tuple[int, int]]:
    """Per tier width: the DELTA parameters a client of that width trains and the bytes of its
    upload (its slice as ``codec`` serializes it, without E)."""
    out = {}
    for width in widths:
        reference, keep = upload_layout(state, arch_json, width, False)
        blocks = blocks_for(state, reference, keep)
        out[float(width)] = (sum(t.numel() for t in blocks.values()), codec.encode_slices(blocks, keep).count_bytes())
    return out


def same_keep(a: Keep, b: Keep) -> bool:
    return list(a) == list(b) and all(len(a[n]) == len(b[n]) and all(torch.equal(x, y) for x, y in zip(a[n], b[n]))
                                      for n in a)


def width_key(width: float) -> str:
    """How a tier is named in metrics: ``w1.000``, ``w0.707``, ``w0.500``, ``w0.354``."""
    return f"w{width:.3f}"
