"""The geometry plugin's pictures (Li et al., "Understanding Robustness Lottery": the per-class
views of angle, length and margin that the paper compares across pruning methods), drawn by
``fl.figures`` from ``Geometry`` measurements and returned as RGB arrays for the run's Report.

    angle_vs_length   per-class scatter of angle to W_y against feature length, right and wrong apart
    margin_by_class   per-class box plots of the signed margin
    shift             a client's model against the global one on the same samples
(The names differ from the plugin's histogram tags, ``global/margin`` among them: TensorBoard
files a tag under one kind only, and an image sharing a histogram's tag does not show.)
Given several models (dense and compressed), the scatter stacks them and the box plots group them
per class, on shared axes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fl import figures
from plugins.geometry.metrics import Geometry


def feature_geometry(geo: Geometry) -> figures.FeatureGeometry:
    """The per-sample arrays a figure reads."""
    return figures.FeatureGeometry(length=geo.length.numpy(), angle=geo.angle.numpy(), margin=geo.margin.numpy(),
                                   labels=geo.labels.numpy(), correct=geo.correct.numpy())


def class_views(models: Mapping[str, Geometry], class_names: Sequence[str], max_classes: int,
                title: str) -> tuple[dict[str, np.ndarray], int]:
    """The scatter and the margin box plots of one or more models; and how many points the scatter drew."""
    points = {name: feature_geometry(geo) for name, geo in models.items()}
    scatter = figures.angle_length_scatter(points, class_names, max_classes=max_classes)
    drawn = figures.scatter_points(scatter)
    margin = figures.margin_boxes(points, class_names, max_classes=max_classes, title=f"margin per class, {title}")
    return {"angle_vs_length": figures.to_rgb(scatter), "margin_by_class": figures.to_rgb(margin)}, drawn


def shift_view(before: Geometry, after: Geometry, class_names: Sequence[str], max_classes: int,
               after_name: str) -> np.ndarray:
    fig = figures.geometry_shift(feature_geometry(before), feature_geometry(after), class_names,
                                 before_name="global", after_name=after_name, max_classes=max_classes)
    return figures.to_rgb(fig)
