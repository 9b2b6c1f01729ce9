"""Real-data loading offline: MNIST test_only from ../shared/data, missing files, CIFAR and
ImageFolder from tiny files made here."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl.data import build_federation, torchvision_sets
from fl.data.torchvision_sets import SOURCES, load_torchvision, read_idx
from fl.errors import ConfigError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_RAW = SHARED_DATA / "MNIST" / "raw"
needs_mnist = pytest.mark.skipif(not (MNIST_RAW / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason="the shared MNIST test files are not present")


def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The official t10k files decoded independently of fl.data (idx: 16/8-byte headers)."""
    with gzip.open(MNIST_RAW / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(10_000, 28, 28)
    with gzip.open(MNIST_RAW / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return images, labels


def _fingerprints(images: np.ndarray, labels: np.ndarray) -> list[tuple[str, int]]:
    return sorted((hashlib.sha1(img.tobytes()).hexdigest(), int(y)) for img, y in zip(images, labels))


@needs_mnist
def test_mnist_test_only_splits_the_official_test_set():
    train, test = load_torchvision("mnist", seed=0, root=str(SHARED_DATA), split="test_only")
    assert (len(train), len(test)) == (8000, 2000)
    assert train.channels == 1 and train.image_size == 28 and train.num_classes == 10
    images, labels = _raw_mnist()
    ours = np.concatenate([train.pixels(np.arange(8000)).numpy(), test.pixels(np.arange(2000)).numpy()])[:, 0]
    ours_labels = np.concatenate([train.labels, test.labels])
    assert _fingerprints(ours, ours_labels) == _fingerprints(images, labels)  # same pixels, nothing lost
    held_share = np.bincount(test.labels, minlength=10) / np.bincount(labels, minlength=10)
    assert np.abs(held_share - 0.2).max() < 0.01  # stratified
    x, y = train.get(np.arange(16))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(train.mean[0] - 0.13) < 0.01 and abs(train.std[0] - 0.31) < 0.01


@needs_mnist
def test_mnist_auto_falls_back_to_test_only_with_a_notice(caplog):
    with caplog.at_level(logging.WARNING, logger="fl.data.torchvision_sets"):
        fed = build_federation("mnist", 20, 3, {"name": "shards", "classes_per_client": 2}, root=str(SHARED_DATA))
    notices = [r for r in caplog.records if "test images alone" in r.getMessage()]
    assert len(notices) == 1
    assert len(fed.train) == 8000 and len(fed.test) == 2000 and fed.channels == 1 and fed.image_size == 28
    assert (fed.histogram > 0).sum(axis=1).max() <= 2
    explicit, _ = load_torchvision("mnist", seed=3, root=str(SHARED_DATA), split="test_only")
    np.testing.assert_array_equal(explicit.labels, fed.train.labels)


@needs_mnist
def test_mnist_standard_without_training_files_says_what_to_do():
    with pytest.raises(ConfigError) as info:
        load_torchvision("mnist", seed=0, root=str(SHARED_DATA), split="standard")
    assert info.value.key == "data.root"
    assert "test_only" in str(info.value) and "data.download=true" in str(info.value)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_absent_files_raise_one_clear_error(name, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_torchvision(name, seed=0, root=str(tmp_path))
    message = str(info.value)
    assert info.value.key == "data.root" and message.startswith("data.root: ")
    assert str(tmp_path) in message and "data.download=true" in message and "point data.root" in message


def test_failed_download_is_reported_in_the_same_error(tmp_path, monkeypatch):
    def offline(root, train):
        raise OSError("network unreachable")

    monkeypatch.setitem(SOURCES, "cifar10", dataclasses.replace(SOURCES["cifar10"], fetch=offline))
    with pytest.raises(ConfigError, match="download failed: OSError: network unreachable"):
        load_torchvision("cifar10", seed=0, root=str(tmp_path), download=True)


def test_bad_split_option():
    with pytest.raises(ConfigError, match="data.split"):
        load_torchvision("cifar10", seed=0, root="/nonexistent", split="everything")


def _write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], key: str = "labels") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"data": images.reshape(len(images), -1), key: labels}, f)


def test_cifar_test_batch_alone_is_read_channels_first(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 3, 32, 32), dtype=np.uint8)
    labels = [i % 10 for i in range(50)]
    _write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", images, labels)
    train, test = load_torchvision("cifar10", seed=0, root=str(tmp_path), split="auto", test_fraction=0.2)
    assert (len(train), len(test)) == (40, 10)
    got = np.concatenate([train.pixels(np.arange(40)).numpy(), test.pixels(np.arange(10)).numpy()])
    got_labels = np.concatenate([train.labels, test.labels])
    assert _fingerprints(got, got_labels) == _fingerprints(images, np.array(labels))


def test_cifar100_standard_split(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    train_images = rng.integers(0, 256, size=(30, 3, 32, 32), dtype=np.uint8)
    _write_cifar_batch(folder / "train", train_images, list(range(30)), key="fine_labels")
    _write_cifar_batch(folder / "test", train_images[:5], list(range(5)), key="fine_labels")
    train, test = load_torchvision("cifar100", seed=0, root=str(tmp_path))
    assert (len(train), len(test), train.num_classes) == (30, 5, 100)
    assert torch.equal(train.pixels(np.arange(30)), torch.from_numpy(train_images))


def test_idx_reader_plain_and_gz(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    (tmp_path / "plain").write_bytes(header + data.tobytes())
    with gzip.open(tmp_path / "packed.gz", "wb") as f:
        f.write(header + data.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "plain"), data)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed"), data)


def _make_image_folder(root: Path, per_class: int = 5) -> dict[str, tuple[int, int, int]]:
    colours = {"cat": (200, 10, 10), "dog": (10, 200, 10), "eel": (10, 10, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + 3 * i, 17 + i), colour).save(root / name / f"{i}.png")
    return colours


def test_imagefolder_single_folder_is_split(tmp_path):
    colours = _make_image_folder(tmp_path / "pics")
    fed = build_federation("imagefolder", 2, 0, {"name": "iid"}, root=str(tmp_path / "pics"), image_size=8,
                           test_fraction=0.4)
    assert fed.num_classes == 3 and fed.channels == 3 and fed.image_size == 8
    assert (len(fed.train), len(fed.test)) == (9, 6)
    pixels = fed.train.pixels(np.arange(9)).numpy()
    for img, label in zip(pixels, fed.train.labels):
        expected = colours[sorted(colours)[label]]
        assert (img == np.array(expected, dtype=np.uint8)[:, None, None]).all()


def test_imagefolder_train_test_layout_and_grayscale(tmp_path):
    _make_image_folder(tmp_path / "train", per_class=3)
    _make_image_folder(tmp_path / "test", per_class=2)
    train, test = torchvision_sets.imagefolder(num_clients=1, seed=0, root=str(tmp_path), image_size=12, channels=1)
    assert (len(train), len(test), train.channels, train.image_size) == (9, 6, 1, 12)
    assert train.get(np.arange(9))[0].shape == (9, 1, 12, 12)


def test_imagefolder_without_images(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        torchvision_sets.imagefolder(num_clients=1, seed=0, root=str(tmp_path))
    with pytest.raises(ConfigError, match="data.root"):
        torchvision_sets.imagefolder(num_clients=1, seed=0, root=None)
