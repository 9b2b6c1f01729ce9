"""XDelta: explaining the difference between an edge model and a high-accuracy base model
(Wang and Nirjon, "XDELTA: Explaining the Difference Between Edge Models and High-Accuracy Base
Models for Vision Tasks"), on the DELTA networks of ``fl.delta``.

    gradcam.py            GradCAM++ on captum's layer gradients (DELTA, edge, base)
    regions.py            maps -> thresholded connected regions
    categories.py         geometric categories: LOCAL/GLOBAL x COMPLEMENT/ENHANCE/MIXED, NONE
    concepts.py           semantic categories from part masks: missed concepts
    pipeline.py           predictions, explained samples, maps, regions, scores (``explain``)
    opportunistic.py      the DELTA run only when the edge's weak classes light up
    compression_study.py  missed concepts of structurally pruned edges
    report.py             example figures per category, markdown and HTML reports
    analysis.py           all of it end to end, and the Report for the run logger
    saved.py              a cached pair + DELTA from disk (``python -m fl.explain``)
    plugin.py             the ``xdelta`` plugin (``plugins=[xdelta]``)
"""

from plugins.xdelta.categories import CATEGORIES, Thresholds, categorize, geometric_scores
from plugins.xdelta.gradcam import GradCAMPlusPlus, gradcam_pp_map
from plugins.xdelta.pipeline import Explanation, explain
from plugins.xdelta.plugin import XDelta
from plugins.xdelta.regions import label_components, threshold_regions

__all__ = ["CATEGORIES", "Explanation", "GradCAMPlusPlus", "Thresholds", "XDelta", "categorize", "explain",
           "geometric_scores", "gradcam_pp_map", "label_components", "threshold_regions"]
