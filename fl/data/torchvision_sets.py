"""Real image datasets: CIFAR-10/100, MNIST, Fashion-MNIST, SVHN and any ImageFolder tree.

Files are looked for under `data.root` in the layout torchvision uses (`cifar-10-batches-py/`,
`cifar-100-python/`, `MNIST/raw/`, `FashionMNIST/raw/`, `train_32x32.mat`/`test_32x32.mat`).
With `data.download=true`, missing files are fetched by the torchvision.datasets classes
(mirrors, checksums, extraction). Each split is converted once to a uint8 `ImageSet`.

torchvision's MNIST and CIFAR classes refuse to read either split unless the files of both are
present (and MNIST's must be uncompressed), which rules out building a federation from the test
files alone. These two formats are therefore read here directly: the idx files (plain or
.gz; http://yann.lecun.com/exdb/mnist/) and the CIFAR pickle batches
(https://www.cs.toronto.edu/~kriz/cifar.html). SVHN is read by torchvision (it checks one split
at a time), ImageFolder by torchvision.datasets.ImageFolder.

`split` chooses where the federation's images come from:
- `standard`: the official training files for the clients, the official test files for testing;
- `test_only`: the official test files alone, split (seeded, stratified) into client training
  data and a held-out test set of `test_fraction`;
- `auto`: `standard` when the training files are present, else `test_only` when the test files
  are (with a notice), else an error that says how to get the files.

`classes` keeps a subset of the classes (e.g. `data.classes=[0,1,...,9]`: ten of CIFAR-100's fine
labels, `sim=delta_paper`): only their images, train and test, with labels remapped to 0..n-1 in
the order given (so `[7, 3]` makes class 7 label 0).
"""

from __future__ import annotations

import gzip
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fl.data.imageset import ImageSet, channel_stats
from fl.data.partition import stratified_split
from fl.data.sources import DATASETS
from fl.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("auto", "standard", "test_only")
DEFAULT_ROOT = "data"
_SPLIT_TAG = 0x5E71  # seed word of the test_only / single-folder split stream

Arrays = tuple[np.ndarray, np.ndarray]  # uint8 images [N, C, H, W], int64 labels [N]


@dataclass(frozen=True)
class _Source:
    """Where a dataset's files live, how to read one split and how to fetch it."""

    name: str
    num_classes: int
    files: Callable[[Path, bool], list[Path]]  # (root, train) -> the files of that split
    read: Callable[[Path, bool], Arrays]
    fetch: Callable[[Path, bool], None]
    holding: str  # what data.root must hold, for the error message


# --- readers ---------------------------------------------------------------------------------------


def _open_maybe_gz(path: Path) -> bytes:
    """The bytes of `path`, or of `path.gz` decompressed when only that exists."""
    if path.exists():
        return path.read_bytes()
    with gzip.open(path.with_name(path.name + ".gz"), "rb") as f:
        return f.read()


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST format; plain or .gz) as a uint8 array of the shape in its header."""
    data = _open_maybe_gz(path)
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_files(folder: str) -> Callable[[Path, bool], list[Path]]:
    def files(root: Path, train: bool) -> list[Path]:
        prefix = "train" if train else "t10k"
        raw = root / folder / "raw"
        return [raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"]

    return files


def _mnist_read(folder: str) -> Callable[[Path, bool], Arrays]:
    def read(root: Path, train: bool) -> Arrays:
        images_file, labels_file = _mnist_files(folder)(root, train)
        images = read_idx(images_file)
        return images[:, None].copy(), read_idx(labels_file).astype(np.int64)

    return read


def _cifar_files(folder: str, train_names: list[str], test_names: list[str]):
    def files(root: Path, train: bool) -> list[Path]:
        return [root / folder / name for name in (train_names if train else test_names)]

    return files


def _cifar_read(files: Callable[[Path, bool], list[Path]], label_key: str):
    def read(root: Path, train: bool) -> Arrays:
        images, labels = [], []
        for path in files(root, train):
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)

    return read


def _svhn_files(root: Path, train: bool) -> list[Path]:
    return [root / f"{'train' if train else 'test'}_32x32.mat"]


def _svhn_read(root: Path, train: bool) -> Arrays:
    from torchvision.datasets import SVHN

    ds = SVHN(str(root), split="train" if train else "test", download=False)
    return np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.labels, dtype=np.int64)


def _fetcher(class_name: str, split_arg: bool = False) -> Callable[[Path, bool], None]:
    def fetch(root: Path, train: bool) -> None:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, class_name)
        if split_arg:
            cls(str(root), split="train" if train else "test", download=True)
        else:
            cls(str(root), train=train, download=True)

    return fetch


_cifar10_files = _cifar_files("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
_cifar100_files = _cifar_files("cifar-100-python", ["train"], ["test"])

SOURCES = {
    "cifar10": _Source("cifar10", 10, _cifar10_files, _cifar_read(_cifar10_files, "labels"), _fetcher("CIFAR10"),
                       "cifar-10-batches-py/ (data_batch_1..5, test_batch)"),
    "cifar100": _Source("cifar100", 100, _cifar100_files, _cifar_read(_cifar100_files, "fine_labels"),
                        _fetcher("CIFAR100"), "cifar-100-python/ (train, test)"),
    "mnist": _Source("mnist", 10, _mnist_files("MNIST"), _mnist_read("MNIST"), _fetcher("MNIST"),
                     "MNIST/raw/ ({train,t10k}-{images-idx3,labels-idx1}-ubyte, plain or .gz)"),
    "fashion_mnist": _Source("fashion_mnist", 10, _mnist_files("FashionMNIST"), _mnist_read("FashionMNIST"),
                             _fetcher("FashionMNIST"),
                             "FashionMNIST/raw/ ({train,t10k}-{images-idx3,labels-idx1}-ubyte, plain or .gz)"),
    "svhn": _Source("svhn", 10, _svhn_files, _svhn_read, _fetcher("SVHN", split_arg=True),
                    "train_32x32.mat and test_32x32.mat"),
}


def _present(path: Path) -> bool:
    return path.exists() or path.with_name(path.name + ".gz").exists()


# --- the dataset factory ---------------------------------------------------------------------------


def check_classes(classes: Any, num_classes: int, key: str = "data.classes") -> tuple[int, ...] | None:
    """`classes` as a tuple of distinct class indices in [0, num_classes) (None: every class)."""
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes:
        raise ConfigError(key, f"must be a non-empty list of class indices in [0, {num_classes}), got {classes!r}")
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ConfigError(key, f"must be a list of class indices in [0, {num_classes}), got {c!r} in {list(classes)}")
        if not 0 <= c < num_classes:
            raise ConfigError(key, f"class index {c} is out of range; this dataset has classes 0..{num_classes - 1}")
        out.append(int(c))
    repeated = sorted({c for c in out if out.count(c) > 1})
    if repeated:
        raise ConfigError(key, f"names class {repeated[0]} more than once; give each class once")
    return tuple(out)


def select_classes(images: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> Arrays:
    """The images of `classes` only, labels remapped to their position in `classes`."""
    remap = np.full(int(labels.max(initial=max(classes))) + 1, -1, dtype=np.int64)
    remap[np.asarray(classes, dtype=np.int64)] = np.arange(len(classes))
    new = remap[labels]
    keep = np.flatnonzero(new >= 0)
    return images[keep], new[keep]


def load_torchvision(name: str, *, seed: int, root: str | None = None, split: str = "auto",
                     test_fraction: float = 0.2, download: bool = False,
                     classes: Sequence[int] | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) image sets of a torchvision dataset, following `split` (see module docstring)."""
    source = SOURCES[name]
    subset = check_classes(classes, source.num_classes)
    if split not in SPLITS:
        raise ConfigError("data.split", f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("data.test_fraction", f"must be in (0, 1), got {test_fraction}")
    folder = Path(DEFAULT_ROOT if root is None else root).expanduser()

    def have(train: bool) -> bool:
        return all(_present(p) for p in source.files(folder, train))

    failure = ""
    if download:
        for train in ((False,) if split == "test_only" else (True, False)):
            if not have(train):
                try:
                    source.fetch(folder, train)
                except Exception as err:  # no network, a dead mirror, a bad checksum
                    failure = f" (download failed: {type(err).__name__}: {err})"
                    break

    mode = split
    if split == "auto":
        mode = "standard" if have(True) and have(False) else "test_only"
    if not have(False) or (mode == "standard" and not have(True)):
        missing = "training files" if have(False) else "files"
        hint = " (the test files are there: data.split=test_only builds the federation from them)" if have(False) else ""
        raise ConfigError("data.root", f"{name} {missing} not found under {folder}{failure}{hint}; download them "
                                       f"with a network (data.download=true) or point data.root at a folder holding "
                                       f"{source.holding}")
    if split == "auto" and mode == "test_only":
        log.warning("%s: training files not found under %s%s; building the federation from the official test "
                    "images alone (%.0f%% held out for testing)", name, folder, failure, 100 * test_fraction)

    if mode == "standard":
        train_x, train_y = source.read(folder, True)
        test_x, test_y = source.read(folder, False)
        if subset is not None:
            (train_x, train_y), (test_x, test_y) = (select_classes(train_x, train_y, subset),
                                                    select_classes(test_x, test_y, subset))
    else:
        images, labels = source.read(folder, False)
        if subset is not None:
            images, labels = select_classes(images, labels, subset)
        kept, held = stratified_split(labels, test_fraction, np.random.default_rng([seed, _SPLIT_TAG]))
        train_x, train_y, test_x, test_y = images[kept], labels[kept], images[held], labels[held]
    if subset is None:
        return _image_sets(name, source.num_classes, train_x, train_y, test_x, test_y)
    return _image_sets(f"{name}[{len(subset)} classes]", len(subset), train_x, train_y, test_x, test_y)


def _image_sets(name, num_classes, train_x, train_y, test_x, test_y) -> tuple[ImageSet, ImageSet]:
    train_pixels = torch.from_numpy(np.ascontiguousarray(train_x))
    mean, std = channel_stats(train_pixels)
    train = ImageSet(train_pixels, train_y, num_classes, mean, std, name=f"{name}/train")
    test = ImageSet(torch.from_numpy(np.ascontiguousarray(test_x)), test_y, num_classes, mean, std, name=f"{name}/test")
    return train, test


def _register(name: str) -> None:
    @DATASETS.register(name)
    def factory(*, num_clients: int, seed: int, root: str | None = None, split: str = "auto",
                test_fraction: float = 0.2, download: bool = False,
                classes: Sequence[int] | None = None) -> tuple[ImageSet, ImageSet]:
        return load_torchvision(name, seed=seed, root=root, split=split, test_fraction=test_fraction,
                                download=download, classes=classes)

    factory.__name__ = name
    factory.__doc__ = f"{name} from torchvision-layout files under data.root (see fl.data.torchvision_sets)."


for _name in SOURCES:
    _register(_name)


# --- ImageFolder -----------------------------------------------------------------------------------


@DATASETS.register("imagefolder")
def imagefolder(*, num_clients: int, seed: int, root: str | None = None, image_size: int = 32,
                channels: int = 3, test_fraction: float = 0.2) -> tuple[ImageSet, ImageSet]:
    """Images in class folders (torchvision.datasets.ImageFolder), resized to image_size, as uint8.

    `root/train` with `root/test` (or `root/val`) gives the two splits; otherwise `root` itself holds
    the class folders and a seeded stratified `test_fraction` of it is held out for testing.
    """
    if root is None:
        raise ConfigError("data.root", "imagefolder needs data.root: a folder of class subfolders "
                                       "(or train/ and test/ folders of class subfolders)")
    if channels not in (1, 3):
        raise ConfigError("data.channels", f"must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ConfigError("data.image_size", f"must be >= 1, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("data.test_fraction", f"must be in (0, 1), got {test_fraction}")
    folder = Path(root).expanduser()
    test_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
    if (folder / "train").is_dir() and test_dir is not None:
        train_x, train_y, classes = _read_folder(folder / "train", image_size, channels)
        test_x, test_y, test_classes = _read_folder(test_dir, image_size, channels)
        if test_classes != classes:
            raise ConfigError("data.root", f"{folder / 'train'} and {test_dir} hold different class folders")
    else:
        images, labels, classes = _read_folder(folder, image_size, channels)
        kept, held = stratified_split(labels, test_fraction, np.random.default_rng([seed, _SPLIT_TAG]))
        train_x, train_y, test_x, test_y = images[kept], labels[kept], images[held], labels[held]
    return _image_sets(f"imagefolder:{folder.name}", len(classes), train_x, train_y, test_x, test_y)


def _read_folder(folder: Path, image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    steps = [transforms.Resize((image_size, image_size))]
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    steps.append(transforms.PILToTensor())
    try:
        ds = ImageFolder(str(folder), transform=transforms.Compose(steps))
    except (FileNotFoundError, OSError) as err:
        raise ConfigError("data.root", f"no images found under {folder} ({err}); point data.root at a folder of "
                                       "class subfolders holding image files") from None
    images = np.empty((len(ds), channels, image_size, image_size), dtype=np.uint8)
    for i in range(len(ds)):
        images[i] = ds[i][0].numpy()
    return images, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)
