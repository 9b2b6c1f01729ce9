"""Client data resident on the compute device (fl/resident_data.py) gives the batches the CPU path
gives, in the same order, and keeps within its budget. The resident and pinned paths run here on
the CPU (a cache told the CPU has room); on a GPU they run under tests/test_compute.py's GPU tests."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from fl.data import build_federation
from fl.local_training import ClientData, batch_bounds
from fl.resident_data import ResidentCache, device_batches
from fl.specs import DataSpec, freeze

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def federation():
    return DataSpec(name="synthetic", num_clients=4, seed=3, partition=freeze({"name": "iid"}),
                    options=freeze({"samples_per_client": 37})).federation()


def roomy(total: int = 1 << 30) -> ResidentCache:
    return ResidentCache(free_memory=lambda device: (total, total))


def gathered(data: ClientData, batch_size: int, seed: int | None, min_size: int = 1):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return list(data.batches(batch_size, generator, min_size))


def resident(data: ClientData, batch_size: int, seed: int | None, cache: ResidentCache, min_size: int = 1):
    permutation = None if seed is None else torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    bounds = batch_bounds(len(data), batch_size, min_size)
    return list(device_batches(data.images, data.indices, bounds, permutation, CPU, cache))


@pytest.mark.parametrize("seed", [None, 0, 11])
@pytest.mark.parametrize("cache", [roomy, lambda: roomy(total=1)], ids=["resident", "pinned-path"])
def test_the_device_path_gives_the_gathered_batches(federation, seed, cache):
    data = ClientData(federation.train, federation.client_indices[1])
    expected = gathered(data, 8, seed, min_size=6)
    got = resident(data, 8, seed, cache(), min_size=6)
    assert [len(x) for x, _ in got] == [len(x) for x, _ in expected] == [8, 8, 8, 13]
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_client_is_gathered_once_and_reused(federation):
    cache = roomy()
    data = ClientData(federation.train, federation.client_indices[0])
    first = cache.samples(data.images, data.indices, CPU)
    again = cache.samples(data.images, data.indices, CPU)
    assert first is not None and first[0] is again[0]
    other = cache.samples(data.images, federation.client_indices[2], CPU)
    assert other[0] is not first[0]
    assert cache.held(CPU) == 2 * (first[0].nelement() * 4 + first[1].nelement() * 8)


def test_the_budget_bounds_what_is_held(federation):
    one = federation.train.get(federation.client_indices[0])
    size = one[0].nelement() * 4 + one[1].nelement() * 8
    cache = ResidentCache(budget_share=0.5, free_memory=lambda device: (10 * size, 3 * size))
    kept = [cache.samples(federation.train, federation.client_indices[p], CPU) for p in range(4)]
    assert [k is not None for k in kept] == [True, False, False, False]  # 2 x size > 0.5 x 3 x size
    assert cache.held(CPU) == size


def test_samples_of_a_finished_run_are_let_go():
    cache = roomy()

    def fresh():  # not through fl.data's per-process federation cache, which would keep it alive
        return build_federation("synthetic", 2, 5, {"name": "iid"}, None, samples_per_client=10)

    fed = fresh()
    cache.samples(fed.train, fed.client_indices[0], CPU)
    assert cache.held(CPU) > 0
    del fed
    gc.collect()
    later = fresh()
    cache.samples(later.train, np.array([0, 1]), CPU)  # any lookup drops what a dead image set held
    assert cache.held(CPU) == 2 * (3 * 32 * 32 * 4 + 8)


def test_the_cpu_path_keeps_nothing(federation, monkeypatch):
    calls = []
    monkeypatch.setattr("fl.local_training.device_batches", lambda *a, **k: calls.append(a) or iter(()))
    data = ClientData(federation.train, federation.client_indices[0])
    assert len(list(data.batches(8, None, device=CPU))) == 5 and calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: keeps a client's samples on it")
def test_on_a_gpu_the_batches_are_the_gathered_ones_and_stay_resident(federation):
    cuda = torch.device("cuda")
    data = ClientData(federation.train, federation.client_indices[3])
    expected = gathered(data, 8, 4)
    got = list(data.batches(8, torch.Generator().manual_seed(4), device=cuda))
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert x.device.type == "cuda" and torch.equal(x.cpu(), ex) and torch.equal(y.cpu(), ey)
    from fl.resident_data import CACHE
    assert CACHE.held(cuda) >= len(data) * 3 * 32 * 32 * 4
