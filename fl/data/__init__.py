"""Datasets, non-IID partitioners and federations.

- `ImageSet`: uint8 images resident once per process, normalized per batch by `get(indices)`.
- `DATASETS`: `synthetic` (the offline default, fl.data.synthetic), `cifar10`, `cifar100`,
  `mnist`, `fashion_mnist`, `svhn` and `imagefolder` (fl.data.torchvision_sets).
- `PARTITIONERS`: `iid`, `shards`, `dirichlet` (fl.data.partition), `label_histogram`, and
  `ClientIndices` (a whole partition in two flat arrays).
- `build_federation` / `get_federation` (memoized per process) / `client_split`.
"""

from fl.data.imageset import ImageSet, channel_stats
from fl.data.partition import PARTITIONERS, ClientIndices, label_histogram, stratified_split
from fl.data.sources import DATASETS
from fl.data.synthetic import SyntheticImageSet
from fl.data import torchvision_sets  # noqa: F401  (registers the torchvision datasets)
from fl.data.federation import (
    Federation,
    build_federation,
    clear_federation_cache,
    client_split,
    get_federation,
    summary,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "ClientIndices",
    "Federation",
    "ImageSet",
    "SyntheticImageSet",
    "build_federation",
    "channel_stats",
    "clear_federation_cache",
    "client_split",
    "get_federation",
    "label_histogram",
    "stratified_split",
    "summary",
]
