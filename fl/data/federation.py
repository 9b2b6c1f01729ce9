"""A federation: one dataset's train/test sets and the split of the training set across clients.

`build_federation` does the work (dataset factory from `DATASETS`, partitioner from
`PARTITIONERS`, label histogram, one summary log line); `get_federation` memoizes it per process
so that every client in a process shares one resident copy of the images.

Nothing here holds an object per client: the partition is one `ClientIndices` (flat arrays) and
the checks and the histogram are vectorized, so a federation of a million clients costs a few
bytes per sample (the synthetic set renders a client's images only when it is read).
"""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fl.data.imageset import ImageSet
from fl.data.partition import PARTITIONERS, ClientIndices, label_histogram
from fl.data.sources import DATASETS
from fl.errors import ConfigError

log = logging.getLogger("fl.data")

NUM_CLIENTS_KEY = "num_clients"
DEFAULT_PARTITION = "iid"
_PARTITION_TAG = 0x9A27  # seed word of the partition stream
_CLIENT_SPLIT_TAG = 0xC5  # seed word of the per-client validation splits
_PARTITIONER_ARGS = ("labels", "num_clients", "rng")


@dataclass(frozen=True, eq=False)
class Federation:
    """Train and test sets, each client's training indices and the per-client label histogram."""

    train: ImageSet
    test: ImageSet
    client_indices: Sequence[np.ndarray]  # a ClientIndices: client_indices[c] is client c's int64 indices
    histogram: np.ndarray  # int64 [num_clients, num_classes]
    num_classes: int
    channels: int
    image_size: int
    name: str

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)


def build_federation(name: str, num_clients: int, seed: int, partition: Mapping[str, Any] | str | None = None,
                     root: str | None = None, **dataset_options) -> Federation:
    """Build dataset `name` and split its training set over `num_clients` clients.

    `partition` is `{"name": <partitioner>, **params}` (a bare name is accepted; default iid).
    The partition is drawn from its own stream of `seed`, so it does not change with the data.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(NUM_CLIENTS_KEY, f"must be an integer >= 1, got {num_clients!r}")
    factory = DATASETS.get(name)
    _check_options(factory, dataset_options, "data", f"dataset {name!r}", skip=("num_clients", "seed", "root"))
    train, test = factory(num_clients=int(num_clients), seed=int(seed), root=root, **dataset_options)
    if num_clients > len(train):
        raise ConfigError(NUM_CLIENTS_KEY, f"{num_clients} clients but {name} has only {len(train)} training "
                                           "images; lower num_clients")

    part_name, params = _partition_spec(partition)
    partitioner = PARTITIONERS.get(part_name)
    _check_options(partitioner, params, "data.partition", f"partitioner {part_name!r}", skip=_PARTITIONER_ARGS)
    rng = np.random.default_rng([int(seed), _PARTITION_TAG])
    parts = ClientIndices.pack(partitioner(train.labels, int(num_clients), rng, **params))
    _check_parts(parts, num_clients, len(train), part_name)

    histogram = label_histogram(train.labels, parts, train.num_classes)
    federation = Federation(train=train, test=test, client_indices=parts, histogram=histogram,
                            num_classes=train.num_classes, channels=train.channels, image_size=train.image_size,
                            name=name)
    log.info("%s", summary(federation, part_name, params))
    return federation


def summary(federation: Federation, partition: str = "", params: Mapping[str, Any] | None = None) -> str:
    """One line: sizes, and the spread of samples and classes per client."""
    sizes = federation.histogram.sum(axis=1)
    classes = (federation.histogram > 0).sum(axis=1)
    how = f"{partition}({', '.join(f'{k}={v}' for k, v in (params or {}).items())})" if partition else "partition"
    return (f"{federation.name}: {len(federation.train)} train / {len(federation.test)} test images, "
            f"{federation.num_classes} classes, {federation.num_clients} clients by {how}; "
            f"samples/client min {sizes.min()} mean {sizes.mean():.1f} max {sizes.max()}; "
            f"classes/client min {classes.min()} mean {classes.mean():.2f} max {classes.max()}")


def client_split(federation: Federation, cid: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `cid`'s samples as (train, validation) index arrays, a seeded `val_fraction` held out.

    The split depends only on (seed, cid) and the client's indices. A client with at least two
    samples keeps at least one for training and, when val_fraction > 0, holds out at least one.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("val_fraction", f"must be in [0, 1), got {val_fraction}")
    if not 0 <= cid < federation.num_clients:
        raise IndexError(f"client {cid} out of range for {federation.num_clients} clients")
    indices = federation.client_indices[cid]
    n_val = int(round(len(indices) * val_fraction))
    if val_fraction > 0 and len(indices) >= 2:
        n_val = min(max(n_val, 1), len(indices) - 1)
    else:
        n_val = min(n_val, len(indices) - 1)
    perm = np.random.default_rng([int(seed), _CLIENT_SPLIT_TAG, int(cid)]).permutation(indices)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --- the per-process memo ------------------------------------------------------------------------

_cache: dict[Any, Federation] = {}
_cache_lock = threading.Lock()


def get_federation(name: str, num_clients: int, seed: int, partition: Mapping[str, Any] | str | None = None,
                   root: str | None = None, **dataset_options) -> Federation:
    """`build_federation` memoized per process on its arguments, so that clients share one copy."""
    key = _freeze((name, num_clients, seed, partition, root, dataset_options))
    with _cache_lock:  # also stops two threads building the same federation twice
        if key not in _cache:
            _cache[key] = build_federation(name, num_clients, seed, partition, root, **dataset_options)
        return _cache[key]


def clear_federation_cache() -> None:
    """Drop every memoized federation (tests; freeing memory between runs in one process)."""
    with _cache_lock:
        _cache.clear()


# --- helpers -------------------------------------------------------------------------------------


def _partition_spec(partition: Mapping[str, Any] | str | None) -> tuple[str, dict[str, Any]]:
    if partition is None:
        return DEFAULT_PARTITION, {}
    if isinstance(partition, str):
        return partition, {}
    params = dict(partition)
    return str(params.pop("name", DEFAULT_PARTITION)), params


def _check_options(fn, options: Mapping[str, Any], prefix: str, what: str, skip: tuple[str, ...]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in skip]
    for key in options:
        if key not in allowed:
            raise ConfigError(f"{prefix}.{key}", f"unknown option for {what}; allowed: {', '.join(allowed) or 'none'}")


def _check_parts(parts: ClientIndices, num_clients: int, n: int, name: str) -> None:
    """A partitioner's contract: one index array per client, disjoint, in range, none empty."""
    if len(parts) != num_clients:
        raise RuntimeError(f"partitioner {name!r} returned {len(parts)} parts for {num_clients} clients")
    flat = parts.flat
    if flat.size and (flat.min() < 0 or flat.max() >= n):
        raise RuntimeError(f"partitioner {name!r} returned indices outside [0, {n})")
    seen = np.zeros(n, dtype=bool)  # one byte per sample rather than a sorted copy of every index
    seen[flat] = True
    if np.count_nonzero(seen) != len(flat):
        raise RuntimeError(f"partitioner {name!r} gave a sample to more than one client")
    del seen
    empty = np.flatnonzero(parts.sizes() == 0).tolist()
    if empty:
        raise ConfigError("data.partition", f"{name} left {len(empty)} client(s) without samples (e.g. client "
                                            f"{empty[0]}); use fewer clients or other partition parameters")


def _freeze(value: Any) -> Any:
    """A hashable stand-in for nested mappings and sequences (the memo key)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value
