"""The dataset registry: name -> factory that returns the (train, test) image sets.

A factory is a keyword-only function `(*, num_clients, seed, root, **options) -> (ImageSet,
ImageSet)`; its extra keyword arguments are the dataset's options (`data.<option>` in the
config), and `build_federation` rejects any option the factory does not declare.
"""

from __future__ import annotations

from typing import Callable

from fl.data.imageset import ImageSet
from fl.registry import Registry

DatasetFactory = Callable[..., "tuple[ImageSet, ImageSet]"]

DATASETS: Registry[DatasetFactory] = Registry("dataset", "data.name")
