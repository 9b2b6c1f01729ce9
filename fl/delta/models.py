"""Zoo entries for DELTA runs: ``delta_fused`` (E + DELTA + the base classifier, built centrally and
cached) and ``pretrained`` (the pair's base or edge model), so that every strategy of a comparison
starts from the same checkpoints (``model=delta``, ``model=pair_base``, ``model=pair_edge``).

Both build, or load from ``cache_dir``, what ``fl.delta.pair`` / ``fl.delta.construct`` produce;
the first build in a process reads the files, later builds reuse them (a fresh module each call).
A build that has to train runs on the ``compute`` device (the option's config interpolates the
run's ``${compute}``); the model returned is on the CPU, like every zoo model.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from fl.errors import ConfigError
from fl.models._api import ZooModel, register_model

DEFAULT_CACHE = ".cache/delta"
_lock = threading.Lock()


def _key(options: dict[str, Any]) -> str:
    from fl.delta.pair import digest

    return digest(options)


@functools.lru_cache(maxsize=8)
def _constructed(key: str, pair: Any, construction: Any, cache_dir: str, threads: int | None, compute: str):
    from fl.delta.construct import ConstructionSpec, ensure_delta
    from fl.delta.pair import PairSpec

    return ensure_delta(PairSpec.from_options(_thaw(pair)), ConstructionSpec.from_options(_thaw(construction)),
                        cache_dir, threads=threads, compute=compute)


@functools.lru_cache(maxsize=8)
def _pair(key: str, pair: Any, cache_dir: str, threads: int | None, compute: str):
    from fl.delta.pair import PairSpec, ensure_pair

    return ensure_pair(PairSpec.from_options(_thaw(pair)), cache_dir, threads=threads, compute=compute)


@functools.lru_cache(maxsize=8)
def _sparse_base(key: str, pair: Any, sparse: Any, cache_dir: str, threads: int | None, compute: str):
    from fl.delta.pair import PairSpec
    from fl.delta.sparse_base import SparseSpec, ensure_sparse_base

    return ensure_sparse_base(PairSpec.from_options(_thaw(pair)), SparseSpec.from_options(_thaw(sparse)), cache_dir,
                              threads=threads, compute=compute)


def _thaw(value: Any) -> Any:
    from fl.delta.pair import _plain

    return _plain(value)


def _freeze(value: Any) -> Any:
    from fl.specs import freeze

    return freeze(_thaw(value)) if isinstance(value, (dict, tuple)) else value


def _check(model: ZooModel, num_classes: int, in_channels: int, image_size: int, what: str) -> None:
    got = (model.classifier.out_features,)
    if got != (num_classes,):
        raise ConfigError("model.pair", f"the cached {what} has {got[0]} classes, the run's data {num_classes}")


@register_model("delta_fused")
def delta_fused(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pair: Any = None,
                construction: Any = None, cache_dir: str = DEFAULT_CACHE, threads: int | None = None,
                compute: str = "auto") -> ZooModel:
    """E + DELTA + the base classifier (``fl.delta.network.FusedDelta``), built from the pair by
    ``fl.delta.construct`` on first use (on the ``compute`` device) and cached; ``pair`` and
    ``construction`` as in ``sim_configs/model/delta.yaml``."""
    from fl.delta.network import FusedDelta, random_arch

    if pair is None:  # no pair: a randomly initialized fused model of a small default shape (tests)
        return FusedDelta(random_arch(num_classes, in_channels, image_size))
    pair_f, construction_f = _freeze(pair), _freeze(construction or {})
    with _lock:
        built = _constructed(_key({"p": _thaw(pair), "c": _thaw(construction or {}), "d": cache_dir}),
                             pair_f, construction_f, str(cache_dir), threads, str(compute))
    model = FusedDelta(built.arch)
    model.load_state_dict(built.state)
    _check(model, num_classes, in_channels, image_size, "DELTA")
    return model


@register_model("pretrained")
def pretrained(*, num_classes: int, in_channels: int = 3, image_size: int = 32, role: str = "base",
               pair: Any = None, sparse: Any = None, cache_dir: str = DEFAULT_CACHE,
               threads: int | None = None, compute: str = "auto") -> ZooModel:
    """The pair's centrally pretrained ``base`` or ``edge`` model (``fl.delta.pair``), trained on
    first use (on the ``compute`` device) and cached: FedAvg and Hermes start from it in ``sim=delta_compare``. With ``sparse``
    (``{sparsity, dense_layers, finetune}``) the base pruned to that sparsity and retrained on the
    server split (``fl.delta.sparse_base``), FedDST's start."""
    import copy

    if role not in ("base", "edge"):
        raise ConfigError("model.role", f"must be base or edge, got {role!r}")
    if sparse is not None and role != "base":
        raise ConfigError("model.sparse", "only the base has a sparse pretraining; use model.role=base")
    if pair is None:  # no pair: the default base or edge, randomly initialized (tests)
        from fl.delta.pair import PairSpec, build_member

        spec = PairSpec.base_default() if role == "base" else {"name": "cnn_small"}
        return build_member(spec, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    pair_f = _freeze(pair)
    with _lock:
        if sparse is not None:
            built = _sparse_base(_key({"p": _thaw(pair), "s": _thaw(sparse), "d": cache_dir}), pair_f,
                                 _freeze(sparse), str(cache_dir), threads, str(compute))
        else:
            built = _pair(_key({"p": _thaw(pair), "d": cache_dir}), pair_f, str(cache_dir), threads, str(compute))
    model = copy.deepcopy(built if sparse is not None else built.base if role == "base" else built.edge)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    _check(model, num_classes, in_channels, image_size, role)
    return model


__all__ = ["delta_fused", "pretrained", "DEFAULT_CACHE"]
