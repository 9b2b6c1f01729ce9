"""The synthetic scenes: determinism, laziness, masks, thread safety, the class design."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.data import DATASETS, SyntheticImageSet
from fl.data.synthetic import CLASSES, CONFUSABLE_PAIRS, PART_NAMES, PARTS, scene_classes
from fl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_same_seed_gives_identical_pixels_and_labels():
    a, b = SyntheticImageSet(300, seed=7), SyntheticImageSet(300, seed=7)
    idx = np.arange(300)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert torch.equal(a.pixels(idx), b.pixels(idx))


def test_rendering_order_and_batching_do_not_matter():
    idx = np.arange(64)
    reference = SyntheticImageSet(64, seed=3).pixels(idx)
    shuffled = SyntheticImageSet(64, seed=3)
    order = np.random.default_rng(0).permutation(64)
    for chunk in np.array_split(order, 9):  # uneven batches in a random order
        shuffled.pixels(chunk)
    singles = SyntheticImageSet(64, seed=3)
    one_by_one = torch.cat([singles.pixels(np.array([i])) for i in idx[::-1]]).flip(0)
    assert torch.equal(shuffled.pixels(idx), reference)
    assert torch.equal(one_by_one, reference)


def test_sample_does_not_depend_on_set_size():
    small, large = SyntheticImageSet(10, seed=5), SyntheticImageSet(5000, seed=5)
    idx = np.arange(10)
    np.testing.assert_array_equal(small.labels, large.labels[:10])
    assert torch.equal(small.pixels(idx), large.pixels(idx))


def test_different_seed_or_stream_differs():
    idx = np.arange(50)
    base = SyntheticImageSet(50, seed=0).pixels(idx)
    assert not torch.equal(base, SyntheticImageSet(50, seed=1).pixels(idx))
    assert not torch.equal(base, SyntheticImageSet(50, seed=0, stream=1).pixels(idx))


def test_bit_identical_in_another_process():
    code = ("import hashlib, numpy as np; from fl.data import SyntheticImageSet; "
            "s = SyntheticImageSet(40, seed=11); "
            "print(hashlib.sha256(s.pixels(np.arange(40)[::-1]).numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    here = SyntheticImageSet(40, seed=11).pixels(np.arange(39, -1, -1)).numpy().tobytes()
    assert out.stdout.strip() == hashlib.sha256(here).hexdigest()


def test_get_returns_normalized_batch():
    ds = SyntheticImageSet(200, seed=0)
    x, y = ds.get(np.array([5, 3, 5, 199]))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == ds.labels[[5, 3, 5, 199]].tolist()
    raw = ds.pixels(np.array([5])).float() / 255
    expected = (raw - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x[:1], expected)
    assert torch.equal(x[0], x[2])
    xs, _ = ds.get(np.arange(200))
    assert abs(xs.mean().item()) < 0.25 and 0.6 < xs.std().item() < 1.5


def test_construction_is_lazy():
    """Nothing is rendered until asked for (speed is not asserted here: tests are not timed)."""
    ds = SyntheticImageSet(50_000, seed=0)
    assert ds._array.nbytes == 50_000 * 3 * 32 * 32  # one uint8 cache, about 150 MB
    assert not ds._rendered.any()
    for k in range(3):
        ds.get(np.arange(50 * k, 50 * k + 50))
    assert ds._rendered.sum() == 150



def test_concurrent_reads_agree_with_a_single_thread():
    idx = np.random.default_rng(1).integers(0, 400, size=(2, 30, 16))  # overlapping batches
    shared = SyntheticImageSet(400, seed=9)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def reader(t: int) -> None:
        barrier.wait()
        for batch in idx[t]:
            results[t].append(shared.get(batch)[0])

    threads = [threading.Thread(target=reader, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    reference = SyntheticImageSet(400, seed=9)
    for t in (0, 1):
        for batch, got in zip(idx[t], results[t]):
            assert torch.equal(got, reference.get(batch)[0])


def test_masks_match_the_class_parts():
    ds = SyntheticImageSet(400, seed=2)
    idx = np.arange(400)
    object_mask, part_mask = ds.masks(idx)
    assert object_mask.shape == part_mask.shape == (400, 32, 32)
    assert object_mask.dtype == torch.bool and part_mask.dtype == torch.int64
    assert torch.equal(object_mask, part_mask > 0)
    complete = 0
    for i in idx:
        present = {ds.part_names[p] for p in part_mask[i].unique().tolist() if p > 0}
        expected = set(ds.parts_of_class[ds.labels[i]])
        assert "body" in present
        assert present <= expected
        complete += present == expected
    assert complete >= 0.97 * len(idx)  # a part may rarely leave the frame at the edges
    # masks do not depend on whether the pixels were cached
    again = SyntheticImageSet(400, seed=2)
    again.get(idx[:100])
    assert torch.equal(again.masks(idx)[1], part_mask)


def test_on_body_parts_contrast_with_the_body():
    ds = SyntheticImageSet(200, seed=4, difficulty=0.0)
    pixels, part_ids = ds.render(np.arange(200))
    on_body = [2 + p for p, part in enumerate(PARTS) if part.on_body]
    checked = 0
    for i in range(200):
        part = np.isin(part_ids[i], on_body)
        if part.any():
            body = part_ids[i] == 1
            gap = np.abs(pixels[i][:, part].mean(axis=1).astype(float) - pixels[i][:, body].mean(axis=1))
            assert gap.max() > 40  # at least one channel clearly differs from the body
            checked += 1
    assert checked > 100


def test_class_design_has_part_and_context_pairs():
    assert len(CLASSES) == 10 and len(set(c.name for c in CLASSES)) == 10
    kinds = {kind for _, _, kind in CONFUSABLE_PAIRS}
    assert kinds == {"part", "context"}
    for a, b, kind in CONFUSABLE_PAIRS:
        ca, cb = CLASSES[a], CLASSES[b]
        assert ca.body == cb.body
        if kind == "part":
            assert ca.context == cb.context and len(set(ca.parts) ^ set(cb.parts)) in (1, 2)
        else:
            assert ca.parts == cb.parts and ca.context != cb.context
    assert PART_NAMES[:2] == ["background", "body"]


def test_more_classes_and_option_checks():
    table = scene_classes(30)
    assert len({(c.body, c.parts, c.context) for c in table}) == 30
    shown_everywhere = {(c.body, c.parts) for c in CLASSES if c.context is None}
    assert all((c.body, c.parts) not in shown_everywhere for c in table[10:])  # no class inside another
    ds = SyntheticImageSet(100, seed=0, num_classes=30)
    assert ds.labels.max() < 30 and ds.get(np.arange(100))[0].shape == (100, 3, 32, 32)
    with pytest.raises(ConfigError, match="data.difficulty"):
        SyntheticImageSet(10, seed=0, difficulty=1.5)
    with pytest.raises(ConfigError, match="data.num_classes"):
        SyntheticImageSet(10, seed=0, num_classes=1)


@pytest.mark.parametrize("difficulty", [0.0, 1.0])
def test_difficulty_extremes_render(difficulty):
    ds = SyntheticImageSet(64, seed=0, difficulty=difficulty)
    pixels, part_ids = ds.render(np.arange(64))
    assert pixels.dtype == np.uint8 and (part_ids == 1).any(axis=(1, 2)).all()


def test_registered_factory_sizes_and_streams():
    train, test = DATASETS.get("synthetic")(num_clients=4, seed=0, samples_per_client=25, test_size=30)
    assert len(train) == 100 and len(test) == 30
    assert not torch.equal(train.pixels(np.arange(30)), test.pixels(np.arange(30)))
    with pytest.raises(ConfigError, match="data.samples_per_client"):
        DATASETS.get("synthetic")(num_clients=4, seed=0, samples_per_client=0)
