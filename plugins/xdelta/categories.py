"""Geometric categories of an explained sample (XDELTA, Section 4.2 and Figure 7).

For a sample that the edge model gets wrong and the reference (the base, or edge+DELTA) gets
right, compare the DELTA's region D with the edge's region E and with the object O:

    overlap  = |E n D| / |D|            how much of what the DELTA adds the edge already looked at
    locality = |D n near(O)| / |D|      how much of the DELTA region is on or near the object;
                                        near(O) = O dilated by ``near_pixels`` (8-neighbourhood);
                                        O = the dataset's object mask, else the base's region

    NONE                    |D| / |image| < ``none_area`` (the DELTA region is negligible:
                            an all-zero or empty map included)
    LOCAL  / GLOBAL         locality >= ``local_min`` / below it
    COMPLEMENT              overlap <= ``complement_max``: the DELTA attends where the edge does not
    ENHANCE                 overlap >= ``enhance_min``: the DELTA reinforces part of the edge's
                            region (sharpening it, suppressing the rest as noise)
    MIXED                   in between

A DELTA region of ``diffuse_area`` of the image or more is counted as diffuse (reported, not a
category): the map was nearly flat or coarser than the object (a 2x2 map on a 32x32 image), so
half its maximum took in most of the image, and overlap then measures the edge region's area
rather than where the DELTA looked.

The paper states the categories in words; the two overlap cut-offs, the locality cut-off, the
dilation and the NONE area are this implementation's (documented, configurable) reading. Every
score is returned with the label; no score is ever NaN (an empty D gives overlap = locality = 0
and NONE; an empty E gives overlap 0; an empty O gives locality 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NONE = "NONE"
CATEGORIES = ("LOCAL_COMPLEMENT", "LOCAL_ENHANCE", "LOCAL_MIXED", "GLOBAL_COMPLEMENT", "GLOBAL_ENHANCE",
              "GLOBAL_MIXED", NONE)


@dataclass(frozen=True)
class Thresholds:
    """Every cut-off of regions and categories (``sim_configs/plugins/xdelta.yaml``)."""

    region_fraction: float = 0.5  # a region: pixels >= this share of the map's maximum
    min_region_pixels: int = 2  # smaller connected regions are dropped as specks
    none_area: float = 0.005  # DELTA region below this share of the image: NONE
    local_min: float = 0.5  # locality at or above: LOCAL
    near_pixels: int = 1  # "near the object": the object mask dilated by this many pixels
    complement_max: float = 0.25  # overlap at or below: COMPLEMENT
    enhance_min: float = 0.75  # overlap at or above: ENHANCE (between the two: MIXED)
    part_coverage: float = 0.5  # semantic: a part is in the DELTA region when this share of it is covered
    diffuse_area: float = 0.5  # reported, not a category: a DELTA region this share of the image or more

    def __post_init__(self):
        for name in ("region_fraction", "none_area", "local_min", "complement_max", "enhance_min", "part_coverage",
                     "diffuse_area"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"xdelta.{name} must be in [0, 1], got {value}")
        if self.region_fraction == 0.0:
            raise ValueError("xdelta.region_fraction must be > 0")
        if self.complement_max > self.enhance_min:
            raise ValueError(f"xdelta.complement_max ({self.complement_max}) must not exceed enhance_min "
                             f"({self.enhance_min})")
        if self.near_pixels < 0 or self.min_region_pixels < 1:
            raise ValueError("xdelta.near_pixels must be >= 0 and min_region_pixels >= 1")


@dataclass(frozen=True)
class GeometricScores:
    overlap: Tensor  # float [B]
    locality: Tensor  # float [B]
    delta_area: Tensor  # float [B], share of the image
    edge_area: Tensor  # float [B]
    categories: list[str]


def dilate(mask: Tensor, pixels: int) -> Tensor:
    """A bool mask [B, H, W] grown by ``pixels`` in the 8-neighbourhood."""
    if pixels <= 0:
        return mask.bool()
    return F.max_pool2d(mask.float()[:, None], 2 * pixels + 1, stride=1, padding=pixels)[:, 0] > 0


def geometric_scores(delta: Tensor, edge: Tensor, obj: Tensor, t: Thresholds) -> GeometricScores:
    """Scores and categories from the DELTA region, the edge region and the object mask (bool [B, H, W])."""
    delta, edge, obj = delta.bool(), edge.bool(), obj.bool()
    pixels = delta.shape[-1] * delta.shape[-2]
    d = delta.flatten(1).sum(1).double()
    safe = d.clamp_min(1.0)
    overlap = torch.where(d > 0, (delta & edge).flatten(1).sum(1).double() / safe, torch.zeros_like(d))
    locality = torch.where(d > 0, (delta & dilate(obj, t.near_pixels)).flatten(1).sum(1).double() / safe,
                           torch.zeros_like(d))
    delta_area = d / pixels
    edge_area = edge.flatten(1).sum(1).double() / pixels
    return GeometricScores(overlap.float(), locality.float(), delta_area.float(), edge_area.float(),
                           [categorize(float(a), float(o), float(loc), t)
                            for a, o, loc in zip(delta_area, overlap, locality)])


def categorize(delta_area: float, overlap: float, locality: float, t: Thresholds) -> str:
    """One sample's category from its scores (see the module docstring)."""
    if not delta_area >= t.none_area or delta_area == 0.0:  # also catches NaN
        return NONE
    where = "LOCAL" if locality >= t.local_min else "GLOBAL"
    if overlap <= t.complement_max:
        how = "COMPLEMENT"
    elif overlap >= t.enhance_min:
        how = "ENHANCE"
    else:
        how = "MIXED"
    return f"{where}_{how}"
