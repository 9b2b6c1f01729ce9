"""Saved models for ``python -m fl.explain`` and the benchmark: a cached pair and its DELTA.

A pair directory (``fl.delta.pair``: ``.cache/delta/pair-<hash>/``) holds ``pair.json`` (the
spec: data, seed, base and edge), ``base.pt`` and ``edge.pt``; a DELTA directory inside it
(``fl.delta.construct``: ``delta-<hash>/``) holds ``arch.json`` and ``fused.pt``. Everything is
checked before anything is built, and every problem is one ``ConfigError`` naming what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl.errors import ConfigError


@dataclass
class SavedPair:
    fused: nn.Module
    base: nn.Module
    spec: dict[str, Any]  # pair.json's "spec"
    pair_dir: Path
    delta_dir: Path
    report: dict[str, Any]  # pair.json merged with the DELTA's report.json (when present)

    def datasets(self):
        """(server split, test set) of the pair's data, as ``fl.delta.pair.server_split`` builds them."""
        from fl.delta.pair import PairSpec, server_split

        return server_split(PairSpec.from_options(self.spec))


def find_delta(pair_dir: Path, delta: str | None) -> Path:
    if delta is not None:
        path = Path(delta) if Path(delta).is_absolute() or Path(delta).exists() else pair_dir / delta
        if not (path / "arch.json").exists() or not (path / "fused.pt").exists():
            raise ConfigError("--delta", f"{path} has no arch.json and fused.pt (a DELTA built by fl.delta.construct)")
        return path
    found = sorted(p for p in pair_dir.glob("delta-*") if (p / "arch.json").exists() and (p / "fused.pt").exists())
    if not found:
        raise ConfigError("--pair-dir", f"{pair_dir} holds no DELTA (delta-*/arch.json and fused.pt); build one with "
                                        "python -m fl.delta.pretrain sim=delta_100clients")
    if len(found) > 1:
        raise ConfigError("--delta", f"{pair_dir} holds {len(found)} DELTAs ({', '.join(p.name for p in found)}); "
                                     "choose one with --delta")
    return found[0]


def load_saved(pair_dir: str | Path, delta: str | None = None) -> SavedPair:
    """The fused edge+DELTA model and the base from a pair directory, in eval mode."""
    from fl.delta.network import DeltaArch, FusedDelta
    from fl.delta.pair import build_member

    pair_dir = Path(pair_dir)
    if not pair_dir.is_dir():
        raise ConfigError("--pair-dir", f"{pair_dir} is not a directory")
    missing = [n for n in ("pair.json", "base.pt", "edge.pt") if not (pair_dir / n).exists()]
    if missing:
        raise ConfigError("--pair-dir", f"{pair_dir} lacks {', '.join(missing)} (a pair cached by fl.delta.pair)")
    try:
        pair_report = json.loads((pair_dir / "pair.json").read_text())
        spec = pair_report["spec"]
    except (ValueError, KeyError) as exc:
        raise ConfigError("--pair-dir", f"{pair_dir / 'pair.json'} is not a pair report ({exc})") from None
    delta_dir = find_delta(pair_dir, delta)
    try:
        arch = DeltaArch.from_json((delta_dir / "arch.json").read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("--delta", f"{delta_dir / 'arch.json'} is not a DELTA architecture ({exc})") from None
    shape = dict(num_classes=arch.num_classes, in_channels=arch.in_channels, image_size=arch.image_size)
    base = build_member(spec["base"], **shape)
    _load(base, pair_dir / "base.pt", "--pair-dir")
    fused = FusedDelta(arch)
    _load(fused, delta_dir / "fused.pt", "--delta")
    report = dict(pair_report)
    if (delta_dir / "report.json").exists():
        report["delta"] = json.loads((delta_dir / "report.json").read_text())
    return SavedPair(fused.eval(), base.eval(), spec, pair_dir, delta_dir, report)


def _load(model: nn.Module, path: Path, key: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # unreadable file or shapes that do not match the architecture
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(key, f"cannot load {path}: {first}") from None
