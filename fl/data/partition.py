"""Label-based partitioners that split one training set across clients.

Every partitioner has the signature `fn(labels, num_clients, rng, **params) -> Sequence[np.ndarray]`
(one sorted int64 index array per client) and assigns every sample to exactly one client:

- `iid`: a seeded random permutation cut into near-equal parts, returned as `ClientIndices`.
- `shards`: the pathological non-IID split of McMahan et al., "Communication-Efficient Learning of
  Deep Networks from Decentralized Data" (AISTATS 2017, Sec. 3): samples sorted by label, cut into
  `num_clients * classes_per_client` shards, `classes_per_client` shards per client. Shards are cut
  inside each class, so a client holds at most `classes_per_client` distinct classes.
- `dirichlet`: per-class proportions over clients drawn from Dir(beta) (Hsu et al., "Measuring the
  Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019), with the
  balancing rule of Wang et al. (FedMA, ICLR 2020) that stops feeding clients already above N/M.

`ClientIndices` holds a whole partition in two flat arrays (every client's indices back to back,
int32 while they fit, and where each client's run starts), so that a million clients cost a few
bytes per sample instead of a NumPy array object each; indexing it gives one client's int64 array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fl.errors import ConfigError
from fl.registry import Registry

PARTITIONERS: Registry = Registry("partitioner", "data.partition.name")

_PARAMS_KEY = "data.partition"


class ClientIndices(Sequence):
    """A partition as flat arrays: client c holds `flat[offsets[c]:offsets[c + 1]]` (sorted).

    `parts[c]` is client c's int64 index array (a fresh copy); `sizes()` and `owners()` answer for
    every client at once without building per-client arrays.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(flat):
            raise ValueError("offsets must run from 0 to len(flat)")
        self.flat = flat
        self.offsets = offsets.astype(np.int64, copy=False)
        self.flat.setflags(write=False)
        self.offsets.setflags(write=False)

    @classmethod
    def pack(cls, parts: Sequence[np.ndarray]) -> ClientIndices:
        """`parts` as one flat array (int32 while every index fits); a `ClientIndices` is returned as is."""
        if isinstance(parts, ClientIndices):
            return parts
        arrays = [np.asarray(p).ravel() for p in parts]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
        if flat.dtype.kind not in "iu":
            flat = flat.astype(np.int64)  # e.g. an empty float array from a user's partitioner
        return cls(flat.astype(_index_dtype(flat.max() + 1 if flat.size else 0)), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, client):
        if isinstance(client, slice):
            return [self[c] for c in range(*client.indices(len(self)))]
        c = int(client)
        if c < 0:
            c += len(self)
        if not 0 <= c < len(self):
            raise IndexError(f"client {client} out of range for {len(self)} clients")
        return self.flat[self.offsets[c]:self.offsets[c + 1]].astype(np.int64)

    def __repr__(self) -> str:
        return f"ClientIndices({len(self)} clients, {len(self.flat)} samples)"

    def sizes(self) -> np.ndarray:
        """Samples per client, int64 [num_clients]."""
        return np.diff(self.offsets)

    def owners(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The client of each entry of `flat[offsets[start]:offsets[stop]]`."""
        stop = len(self) if stop is None else stop
        return np.repeat(np.arange(start, stop, dtype=_index_dtype(stop)), self.sizes()[start:stop])


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> ClientIndices:
    """Uniformly random, near-equal split (sizes differ by at most one).

    The permutation cut as `np.array_split(rng.permutation(n), num_clients)` would cut it (the
    first n % num_clients clients one sample more), each part sorted, built in place in one flat
    array: shuffling `arange(n)` draws exactly what `rng.permutation(n)` draws, in int32 when it fits.
    """
    _check_clients(labels, num_clients)
    n = len(labels)
    flat = np.arange(n, dtype=_index_dtype(n))
    rng.shuffle(flat)
    size, larger = divmod(n, num_clients)
    head = larger * (size + 1)  # the first `larger` clients hold size + 1 samples
    flat[:head].reshape(larger, size + 1).sort(axis=1)
    flat[head:].reshape(num_clients - larger, size).sort(axis=1)
    offsets = np.concatenate([np.arange(larger + 1, dtype=np.int64) * (size + 1),
                              head + np.arange(1, num_clients - larger + 1, dtype=np.int64) * size])
    return ClientIndices(flat, offsets)


@PARTITIONERS.register("shards")
def shards(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
           classes_per_client: int = 3) -> list[np.ndarray]:
    """k single-class shards per client (McMahan et al. 2017), so at most k classes per client.

    Each class is cut into a number of shards proportional to its size (at least one), the
    `num_clients * k` shards are dealt k per client, preferring classes the client does not hold yet.
    """
    _check_clients(labels, num_clients)
    k = int(classes_per_client)
    if k < 1:
        raise ConfigError(f"{_PARAMS_KEY}.classes_per_client", f"must be >= 1, got {classes_per_client}")
    classes, counts = np.unique(labels, return_counts=True)
    num_shards = num_clients * k
    if num_shards < len(classes):
        raise ConfigError(f"{_PARAMS_KEY}.classes_per_client",
                          f"{num_clients} clients x {k} shards cannot cover the {len(classes)} classes present; "
                          "raise classes_per_client or the number of clients")
    if num_shards > len(labels):
        raise ConfigError(f"{_PARAMS_KEY}.classes_per_client",
                          f"{num_shards} shards for {len(labels)} samples; lower classes_per_client")
    shards_per_class = _apportion(counts, num_shards)

    pool: list[list[np.ndarray]] = []
    for cls, n_shards in zip(classes, shards_per_class):
        members = rng.permutation(np.flatnonzero(labels == cls))
        pool.append(list(np.array_split(members, n_shards)))

    # Deal one shard per client per round, each from a class the client lacks where possible,
    # drawn in proportion to the shards left (so large classes are used up evenly).
    remaining = shards_per_class.astype(np.float64)
    held = np.zeros((num_clients, len(classes)), dtype=bool)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for _ in range(k):
        for client in rng.permutation(num_clients):
            weights = remaining * ~held[client]
            if weights.sum() == 0:  # only classes this client already holds are left
                weights = remaining.copy()
            c = rng.choice(len(classes), p=weights / weights.sum())
            parts[client].append(pool[c].pop())
            remaining[c] -= 1
            held[client, c] = True
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


@PARTITIONERS.register("dirichlet")
def dirichlet(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
              beta: float = 0.5, min_size: int = 2, max_tries: int = 100) -> list[np.ndarray]:
    """Per-class Dir(beta) proportions over clients; small beta gives few classes per client.

    Draws are repeated (up to `max_tries`) until every client holds at least `min_size` samples
    (capped at N / num_clients); if none succeeds, the smallest clients are topped up with samples
    taken from the largest ones, so the result never has an empty client.
    """
    _check_clients(labels, num_clients)
    if not beta > 0:
        raise ConfigError(f"{_PARAMS_KEY}.beta", f"must be > 0, got {beta}")
    n = len(labels)
    min_size = max(1, min(int(min_size), n // num_clients))
    classes = np.unique(labels)
    for _ in range(max(1, int(max_tries))):
        counts = _dirichlet_counts(np.bincount(labels)[classes], num_clients, beta, rng)
        if counts.sum(axis=0).min() >= min_size:
            break
    # Client c takes the c-th run of each class's shuffled members, of length counts[class, c].
    owner = np.empty(n, dtype=np.int64)
    for cls, row in zip(classes, counts):
        owner[rng.permutation(np.flatnonzero(labels == cls))] = np.repeat(np.arange(num_clients), row)
    parts = _group(owner, num_clients)
    if min(len(p) for p in parts) < min_size:
        parts = _top_up(parts, min_size, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int,
                    chunk: int = 1 << 14) -> np.ndarray:
    """Samples per class for every client: int64 [num_clients, num_classes] (labels >= num_classes
    are not counted); a `ClientIndices` is counted `chunk` clients at a time, without a loop per client."""
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    if not isinstance(parts, ClientIndices):
        for i, part in enumerate(parts):
            hist[i] = np.bincount(labels[part], minlength=num_classes)[:num_classes]
        return hist
    for start in range(0, len(parts), chunk):
        stop = min(start + chunk, len(parts))
        cells = labels[parts.flat[parts.offsets[start]:parts.offsets[stop]]].astype(np.int64)
        keep = (cells >= 0) & (cells < num_classes)
        cells += (parts.owners(start, stop) - start).astype(np.int64) * num_classes
        counts = np.bincount(cells[keep], minlength=(stop - start) * num_classes)
        hist[start:stop] = counts.reshape(stop - start, num_classes)
    return hist


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (kept, held_out) sorted index arrays, `fraction` of every class held out."""
    kept, held = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_held = int(round(len(members) * fraction))
        held.append(members[:n_held])
        kept.append(members[n_held:])
    return np.sort(np.concatenate(kept)).astype(np.int64), np.sort(np.concatenate(held)).astype(np.int64)


def _dirichlet_counts(class_sizes: np.ndarray, num_clients: int, beta: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Samples of each class per client, int [num_classes, num_clients]."""
    n = class_sizes.sum()
    sizes = np.zeros(num_clients, dtype=np.int64)
    counts = np.zeros((len(class_sizes), num_clients), dtype=np.int64)
    for c, size in enumerate(class_sizes):
        p = rng.dirichlet(np.full(num_clients, beta)) * (sizes < n / num_clients)  # FedMA balancing
        total = p.sum()
        p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
        cuts = np.concatenate([[0], (np.cumsum(p)[:-1] * size).astype(np.int64), [size]])
        counts[c] = np.diff(np.maximum.accumulate(np.minimum(cuts, size)))
        sizes += counts[c]
    return counts


def _group(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(num_clients + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(num_clients)]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move samples from the largest clients to those below `min_size`."""
    pools = [list(rng.permutation(p)) for p in parts]
    sizes = np.array([len(p) for p in pools])
    for small in np.flatnonzero(sizes < min_size):
        while sizes[small] < min_size:
            donor = int(np.argmax(sizes))
            pools[small].append(pools[donor].pop())
            sizes[donor] -= 1
            sizes[small] += 1
    return [np.asarray(p, dtype=np.int64) for p in pools]


def _apportion(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of `total` proportional to `counts`, each in [1, count] (largest remainder)."""
    counts = counts.astype(np.int64)
    share = np.ones_like(counts)
    spare = total - share.sum()
    if spare > 0:
        ideal = counts / counts.sum() * total - 1
        extra = np.minimum(np.floor(np.clip(ideal, 0, None)).astype(np.int64), counts - 1)
        share += extra
        spare = total - share.sum()
        order = np.argsort(-(ideal - np.floor(ideal)), kind="stable")
        while spare > 0:
            for c in order:
                if spare > 0 and share[c] < counts[c]:
                    share[c] += 1
                    spare -= 1
    return share


def _index_dtype(n: int) -> type:
    """int32 for indices below `n` where they fit (half the memory of int64), else int64."""
    return np.int32 if n <= np.iinfo(np.int32).max else np.int64


def _check_clients(labels: np.ndarray, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError("num_clients", f"must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise ConfigError("num_clients", f"{num_clients} clients but only {len(labels)} training samples")
