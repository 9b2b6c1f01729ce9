"""XDelta (plugins/xdelta): GradCAM++ against an independent formula, regions, the seven
categories on hand-made masks, empty maps, concepts, the CLI's error handling and outputs, the
plugin's config, and (slow) a designed edge weakness that the explanations must point at."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from plugins.xdelta.categories import CATEGORIES, NONE, Thresholds, categorize, geometric_scores
from plugins.xdelta.concepts import inherited, part_coverage
from plugins.xdelta.gradcam import (Explainers, GradCAMPlusPlus, conv_activations, delta_layer, gradcam_pp_map,
                                    last_conv_activation, not_inplace)
from plugins.xdelta.regions import label_components, threshold_regions


# -- GradCAM++ ------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self, head: str):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1), nn.ReLU())
        self.head = head
        self.mix = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.body(x)
        if self.head == "gap":
            return self.fc(a.mean(dim=(2, 3)))
        return self.fc(torch.tanh(self.mix(a)).amax(dim=(2, 3)) + (a ** 2).mean(dim=(2, 3)))


def numpy_gradcam_pp(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The GradCAM++ formula written out per sample, channel and pixel, in float64 numpy."""
    out = np.zeros((a.shape[0],) + a.shape[2:])
    for b in range(a.shape[0]):
        total = np.zeros(a.shape[2:])
        for k in range(a.shape[1]):
            s = a[b, k].sum()
            w = 0.0
            for i in range(a.shape[2]):
                for j in range(a.shape[3]):
                    gij = g[b, k, i, j]
                    den = 2 * gij ** 2 + s * gij ** 3
                    alpha = 0.0 if gij == 0 or den == 0 else gij ** 2 / den
                    w += alpha * max(gij, 0.0)
            total += w * a[b, k]
        out[b] = np.maximum(total, 0.0)
    return out


def test_gradcam_pp_matches_the_formula_with_analytic_gradients():
    # GAP then linear: dY_c/dA_k,ij = W[c, k] / (h w), no autograd needed for the reference
    model = Tiny("gap").double().eval()
    x = torch.randn(3, 2, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    got = GradCAMPlusPlus(model, model.body[3]).attribute(x, target, upsample=False).numpy()
    with torch.no_grad():
        a = model.body(x).numpy()
    w = model.fc.weight.detach().numpy()
    g = np.broadcast_to(w[target.numpy()][:, :, None, None] / (6 * 5), a.shape)
    expected = numpy_gradcam_pp(a, g)
    assert expected.max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_gradcam_pp_matches_the_formula_with_a_nonlinear_head():
    model = Tiny("nonlinear").double().eval()
    x = torch.randn(4, 2, 7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = torch.tensor([1, 0, 2, 1])
    got = GradCAMPlusPlus(model, model.body[3]).attribute(x, target, upsample=False).numpy()
    a = model.body(x).detach().requires_grad_(True)  # reference gradients by plain autograd, not captum
    y = model.fc(torch.tanh(model.mix(a)).amax(dim=(2, 3)) + (a ** 2).mean(dim=(2, 3)))
    g, = torch.autograd.grad(y.gather(1, target[:, None]).sum(), a)
    expected = numpy_gradcam_pp(a.detach().numpy(), g.numpy())
    assert (g == 0).any() and (g != 0).any()  # both branches of the alpha formula are exercised
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    up = GradCAMPlusPlus(model, model.body[3]).attribute(x, target)
    assert up.shape == (4, 7, 7)


def test_upsampled_map_has_the_input_size_and_is_bilinear():
    model = Tiny("gap").eval()
    pooled = nn.Sequential(model.body, nn.MaxPool2d(2))
    net = lambda x: model.fc(pooled(x).mean(dim=(2, 3)))  # noqa: E731
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    cam = GradCAMPlusPlus(net, pooled[1])
    small, big = cam.attribute(x, 1, upsample=False), cam.attribute(x, 1)
    assert small.shape == (2, 4, 4) and big.shape == (2, 8, 8)
    ref = torch.nn.functional.interpolate(small[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(big, ref.clamp_min(0))


def test_zero_gradients_give_an_all_zero_map_and_no_nan():
    model = Tiny("gap").eval()
    with torch.no_grad():
        model.fc.weight.zero_()
    x = torch.randn(2, 2, 6, 6)
    cam = GradCAMPlusPlus(model, model.body[3]).attribute(x, 0)
    assert torch.isfinite(cam).all() and (cam == 0).all()
    assert gradcam_pp_map(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)).eq(0).all()


def test_edge_layer_is_the_rectified_last_conv_and_copies_are_not_inplace():
    from fl.models import get_model

    edge = get_model("cnn_small", num_classes=10)
    layer = last_conv_activation(edge.features)
    assert isinstance(layer, nn.ReLU) and layer is edge.features[7]
    copy = not_inplace(edge)
    assert not any(getattr(m, "inplace", False) for m in copy.modules())
    assert edge.features[1].inplace  # the original is untouched


def test_delta_layer_is_the_se_output_unless_its_map_is_smaller_than_asked():
    from fl.delta.network import FusedDelta, random_arch

    fused = FusedDelta(random_arch(10)).eval()  # convs 32x32 and 16x16 (each pooled after), SE map 8x8
    shape = (3, 32, 32)
    convs = conv_activations(fused.delta.features)
    assert [type(m) for m in convs] == [nn.ReLU, nn.ReLU]
    assert delta_layer(fused, shape, 0) is fused.delta.se
    assert delta_layer(fused, shape, 8) is fused.delta.se
    assert delta_layer(fused, shape, 9) is convs[1] and delta_layer(fused, shape, 16) is convs[1]
    assert delta_layer(fused, shape, 32) is convs[0]
    with pytest.raises(ValueError, match="no DELTA layer has a map of at least 33x33 \\(largest 32x32\\)"):
        delta_layer(fused, shape, 33)
    x = torch.rand(2, 3, 32, 32)
    for size, side in ((0, 8), (16, 16), (32, 32)):
        cam = Explainers(fused, delta_map_size=size).delta_cam.attribute(x, 0, upsample=False)
        assert cam.shape == (2, side, side) and torch.isfinite(cam).all()


# -- regions ----------------------------------------------------------------------------------------

def test_regions_are_connected_components_above_the_threshold():
    m = torch.zeros(1, 8, 8)
    m[0, 1:3, 1:3] = 1.0  # component A (4 px)
    m[0, 5:8, 5:7] = 0.8  # component B (6 px)
    m[0, 0, 7] = 0.9  # a one-pixel speck
    m[0, 4, 0] = 0.3  # below half of the maximum
    r = threshold_regions(m, fraction=0.5, min_pixels=1)
    assert int(r.count[0]) == 3 and int(r.mask.sum()) == 11
    r = threshold_regions(m, fraction=0.5, min_pixels=2)
    assert int(r.count[0]) == 2 and int(r.mask.sum()) == 10 and not r.mask[0, 0, 7]
    assert set(r.labels[0].unique().tolist()) == {0, 1, 2}
    diag = torch.eye(4, dtype=torch.bool)[None]
    assert int(label_components(diag, 8)[1][0]) == 1 and int(label_components(diag, 4)[1][0]) == 4
    snake = torch.zeros(1, 7, 7, dtype=torch.bool)
    snake[0, ::2, :] = True
    snake[0, 1, 6] = snake[0, 3, 0] = snake[0, 5, 6] = True
    assert int(label_components(snake, 4)[1][0]) == 1


@pytest.mark.parametrize("fill", [0.0, float("nan"), -1.0])
def test_empty_and_degenerate_maps_give_no_region(fill):
    maps = torch.full((2, 6, 6), fill)
    r = threshold_regions(maps, 0.5)
    assert not r.mask.any() and r.count.eq(0).all()
    empty = threshold_regions(torch.zeros(0, 6, 6), 0.5)
    assert empty.mask.shape == (0, 6, 6)


# -- categories ---------------------------------------------------------------------------------------

def _box(r0, r1, c0, c1, size=16):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


OBJECT = _box(4, 12, 4, 12)  # an 8x8 object in the middle of a 16x16 image
CASES = {  # name: (DELTA region, edge region, expected overlap, expected locality)
    "LOCAL_COMPLEMENT": (_box(4, 8, 4, 8), _box(8, 12, 8, 12), 0.0, 1.0),
    "LOCAL_ENHANCE": (_box(6, 8, 6, 8), _box(4, 12, 4, 12), 1.0, 1.0),
    "LOCAL_MIXED": (_box(4, 8, 4, 8), _box(4, 8, 6, 12), 0.5, 1.0),
    "GLOBAL_COMPLEMENT": (_box(0, 2, 14, 16), _box(4, 12, 4, 12), 0.0, 0.0),
    "GLOBAL_ENHANCE": (_box(0, 2, 14, 16), _box(0, 4, 12, 16), 1.0, 0.0),
    "GLOBAL_MIXED": (_box(0, 2, 14, 16), _box(0, 1, 12, 16), 0.5, 0.0),
    NONE: (torch.zeros(16, 16, dtype=torch.bool), _box(4, 12, 4, 12), 0.0, 0.0),
}


def test_the_seven_categories_on_hand_made_masks():
    assert set(CASES) == set(CATEGORIES)
    delta = torch.stack([c[0] for c in CASES.values()])
    edge = torch.stack([c[1] for c in CASES.values()])
    s = geometric_scores(delta, edge, OBJECT.expand(len(CASES), 16, 16), Thresholds(near_pixels=1))
    assert s.categories == list(CASES)
    torch.testing.assert_close(s.overlap, torch.tensor([c[2] for c in CASES.values()]))
    torch.testing.assert_close(s.locality, torch.tensor([c[3] for c in CASES.values()]))
    assert torch.isfinite(s.overlap).all() and torch.isfinite(s.locality).all()


def test_thresholds_move_the_boundaries():
    t = Thresholds()
    assert categorize(0.1, 0.5, 0.9, t) == "LOCAL_MIXED"
    assert categorize(0.1, 0.5, 0.9, Thresholds(complement_max=0.5)) == "LOCAL_COMPLEMENT"
    assert categorize(0.1, 0.5, 0.9, Thresholds(enhance_min=0.5)) == "LOCAL_ENHANCE"
    assert categorize(0.1, 0.5, 0.4, t) == "GLOBAL_MIXED"
    assert categorize(0.1, 0.5, 0.4, Thresholds(local_min=0.4)) == "LOCAL_MIXED"
    assert categorize(0.004, 0.5, 0.9, t) == NONE and categorize(0.004, 0.5, 0.9, Thresholds(none_area=0.001)) != NONE
    assert categorize(float("nan"), float("nan"), float("nan"), t) == NONE
    # "near" the object: one pixel off the object counts with near_pixels=1, not with 0
    off = _box(2, 4, 6, 8)[None]
    assert geometric_scores(off, off, OBJECT[None], Thresholds(near_pixels=1)).categories == ["LOCAL_ENHANCE"]
    assert geometric_scores(off, off, OBJECT[None], Thresholds(near_pixels=0)).categories == ["GLOBAL_ENHANCE"]
    with pytest.raises(ValueError):
        Thresholds(complement_max=0.8, enhance_min=0.5)


def test_all_zero_maps_end_as_none_through_regions_and_scores():
    zero = torch.zeros(3, 16, 16)
    regions = threshold_regions(zero, 0.5)
    s = geometric_scores(regions.mask, threshold_regions(torch.rand(3, 16, 16), 0.5).mask, OBJECT.expand(3, 16, 16),
                         Thresholds())
    assert s.categories == [NONE] * 3 and s.overlap.eq(0).all() and s.locality.eq(0).all()


def test_concepts_are_the_parts_the_delta_region_covers():
    parts = torch.zeros(1, 8, 8, dtype=torch.long)
    parts[0, 2:6, 2:6] = 1  # body, 16 px
    parts[0, 3, 3] = 2  # a 1-pixel part on it
    parts[0, 0, 6:8] = 3  # a 2-pixel part elsewhere
    delta = torch.zeros(1, 8, 8, dtype=torch.bool)
    delta[0, 2:4, 2:4] = True  # the 1-pixel part and 3 of the body's 15 remaining pixels, no background
    cov = part_coverage(delta, parts, 5)
    torch.testing.assert_close(cov[0], torch.tensor([0.0, 3 / 15, 1.0, 0.0, 0.0]))
    names = ["background", "body", "eye", "tail", "absent"]
    assert inherited(cov, names, 0.5) == [["eye"]]
    assert inherited(cov, names, 0.15) == [["body", "eye"]]


# -- CLI and plugin config ------------------------------------------------------------------------------

def _tiny_pair_dir(tmp_path):
    """A pair directory of randomly initialized small models on a small synthetic test set."""
    from fl.delta.network import FusedDelta, random_arch
    from fl.delta.pair import build_member

    pair_dir = tmp_path / "pair-test"
    (pair_dir / "delta-test").mkdir(parents=True)
    spec = {"data": {"name": "synthetic", "test_size": 120, "samples_per_client": 1}, "seed": 0, "server_samples": 40,
            "base": {"name": "cnn_small", "width": 0.25}, "edge": {"name": "cnn_small", "width": 0.25}}
    (pair_dir / "pair.json").write_text(json.dumps({"spec": spec}))
    torch.manual_seed(0)
    base = build_member(spec["base"], num_classes=10, in_channels=3, image_size=32)
    edge = build_member(spec["edge"], num_classes=10, in_channels=3, image_size=32)
    torch.save(base.state_dict(), pair_dir / "base.pt")
    torch.save(edge.state_dict(), pair_dir / "edge.pt")
    arch = random_arch(10, edge=("cnn_small", (("width", 0.25),)), feature_dim=base.classifier.in_features)
    fused = FusedDelta(arch, edge=edge)
    fused.classifier.load_state_dict(base.classifier.state_dict())
    torch.save(fused.state_dict(), pair_dir / "delta-test" / "fused.pt")
    (pair_dir / "delta-test" / "arch.json").write_text(arch.to_json())
    return pair_dir


def test_cli_writes_a_complete_report(tmp_path, capsys):
    from fl.explain import main

    pair_dir = _tiny_pair_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["--pair-dir", str(pair_dir), "--out", str(out), "--samples", "60", "--no-tensorboard"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "scores.jsonl", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert summary["evaluated"] == 60 and summary["explained"] == len(rows)
    assert sum(c["count"] for c in summary["categories"].values()) == len(rows)
    for r in rows:
        assert r["category"] in CATEGORIES and 0 <= r["overlap"] <= 1 and 0 <= r["locality"] <= 1
    assert summary["diffuse"] == sum(r["delta_area"] >= summary["thresholds"]["diffuse_area"] for r in rows)
    assert f"diffuse DELTA regions (>= 0.50 of the image): {summary['diffuse']} of {len(rows)}" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert "diffuse DELTA regions" in html
    assert "<html" in html and "http" not in html.replace("http-equiv", "")  # self-contained
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary folder left


def _embedded_pngs(html_text: str) -> int:
    """Decode every base64 PNG of an HTML report with Pillow; each must be a non-blank picture."""
    import base64
    import re

    from tests.test_figures import assert_picture

    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
    for data in found:
        assert_picture(base64.b64decode(data))
    return len(found)


def test_example_figures_per_category_in_the_report_and_the_html(tmp_path):
    """Each category with explained samples: one figure whose rows are its samples (input, edge and
    DELTA GradCAM++ maps, regions), the same image in the Report and embedded in the HTML."""
    from plugins.xdelta import report as render
    from plugins.xdelta.analysis import XDeltaSettings, analyze, to_report
    from plugins.xdelta.saved import load_saved
    from tests.test_figures import assert_picture

    saved = load_saved(str(_tiny_pair_dir(tmp_path)), None)
    _, test = saved.datasets()
    settings = XDeltaSettings(samples=60, examples=2, opportunistic=False)
    result = analyze(saved.fused, saved.base, test, settings)
    report = to_report(result, test, settings)
    counts = result.summary["category_counts"]
    assert counts and sorted(report.images) == sorted(f"examples/{c}" for c in counts)
    drawn = {k.split("/")[1]: v for k, v in report.images.items()}
    for category, image in drawn.items():
        assert_picture(image)
        again = render.examples(result.explanation, test, 2)[category][0]
        np.testing.assert_array_equal(again, image)  # the HTML's figure is the logged one
    html_text = render.html_report(result.summary, result.explanation, test, per_category=2, drawn=drawn)
    assert _embedded_pngs(html_text) == len(counts)
    assert "GradCAM++" in html_text and "dashed orange outline" in html_text
    import inspect

    assert "zlib" not in inspect.getsource(render)  # PNGs come from Pillow (fl.figures.png_bytes)


@pytest.mark.parametrize("args, key", [
    (["--pair-dir", "{tmp}/missing"], "--pair-dir"),
    (["--pair-dir", "{pair}", "--delta", "nope"], "--delta"),
    (["--pair-dir", "{pair}", "--threshold", "1.5"], "--threshold"),
    (["--pair-dir", "{pair}", "--samples", "0"], "--samples"),
    (["--pair-dir", "{pair}", "--delta-map-size", "-1"], "--delta-map-size"),
    (["--pair-dir", "{pair}", "--delta-map-size", "64"], "--delta-map-size"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, key):
    from fl.explain import main

    pair_dir = _tiny_pair_dir(tmp_path)
    argv = [a.format(tmp=tmp_path, pair=pair_dir) for a in args] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}:")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_corrupt_checkpoint(tmp_path, capsys):
    from fl.explain import main

    pair_dir = _tiny_pair_dir(tmp_path)
    (pair_dir / "base.pt").write_bytes(b"not a checkpoint")
    assert main(["--pair-dir", str(pair_dir), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: --pair-dir: cannot load")
    assert not (tmp_path / "out").exists()


def test_plugin_config_composes_and_builds():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.helpers import compose_config

    cfg = compose_config(["plugins=[xdelta]", "model=delta"])
    options = OmegaConf.to_container(cfg.plugins.xdelta, resolve=True)
    assert options["pair"]["base"] == {"name": "vgg11", "width": 0.5} and options["cache_dir"]
    plugin = instantiate(options)
    assert plugin.settings.thresholds.region_fraction == 0.5
    plain = OmegaConf.to_container(compose_config(["plugins=[xdelta]"]).plugins.xdelta, resolve=True)
    assert plain["pair"] is None  # no DELTA pair: edge+DELTA is the reference


# -- the designed weakness ------------------------------------------------------------------------------

@pytest.mark.slow
def test_designed_weakness_points_at_the_part():
    """disc-left_eye, disc-both_eyes, box-spot at difficulty 0, with an edge that never learned the
    right eye (disc-both_eyes trained as disc-left_eye). Both disc classes have the left eye; only
    the right eye tells them apart. So the edge looks at the disc and calls it disc-left_eye, and the
    DELTA must add the right eye: a region on the object, inside what the edge looked at
    (LOCAL_ENHANCE), whose missed concept is right_eye. The issue's criterion: >= 80% of the
    explained samples in that one category (measured: 154 of 161, 95.7%; seed 1: 99 of 104) and
    right_eye the top missed concept of disc-both_eyes (measured 0.99).
    """
    from plugins.xdelta.pipeline import explain

    started = time.perf_counter()
    from tests.xdelta_designed import designed_pair

    fused, base, test = designed_pair([0, 2, 3], blind_to=1, seen_as=0)
    e = explain(fused, base, test, np.arange(len(test)), Thresholds())
    acc = e.predictions.accuracy()
    summary = e.summary()
    print(json.dumps({"accuracy": acc, "explained": len(e), "counts": summary["category_counts"],
                      "top": summary["top_concepts_per_class"], "seconds": time.perf_counter() - started}, default=str))
    assert acc["fused"] > acc["edge"] + 0.2 and acc["base"] > acc["edge"] + 0.2
    assert len(e) >= 50
    assert np.mean(e.labels == 1) >= 0.8  # the explained samples are the designed class
    assert summary["category_counts"].get("LOCAL_ENHANCE", 0) >= 0.8 * len(e)
    top = e.concept_counts.top(1, 1)
    assert top and top[0][0] == "right_eye"


def test_the_plugin_explains_the_final_model_of_a_delta_run(tmp_path):
    """plugins=[xdelta,geometry] at the end of a (tiny) DELTA run, as the README's headline command:
    the report lands in the run directory through the run's logger, the categories cover the
    explained samples, and TensorBoard holds both plugins' pictures."""
    from tests.helpers import run_inprocess
    from tests.test_delta_strategy import TINY

    summary, run_dir = run_inprocess(tmp_path / "run", [
        "sim=delta_100clients", "num_clients=4", "fraction_fit=0.5", "rounds=1", f"model.cache_dir={tmp_path}/cache",
        "plugins=[xdelta,geometry]", "plugins.xdelta.samples=64", "plugins.xdelta.opportunistic=false",
        "plugins.geometry.samples=32", "tensorboard=true", *TINY])
    assert summary["status"] == "complete"
    html_text = (run_dir / "xdelta_report.html").read_text(encoding="utf-8")
    assert html_text.lstrip().lower().startswith("<!doctype html") or "<html" in html_text[:200].lower()
    assert not list(run_dir.glob("*.tmp"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("plugin/xdelta/")}
    counts = [v for tag, v in last.items() if tag.startswith("plugin/xdelta/count/")]
    assert last["plugin/xdelta/evaluated"] == 64 and len(counts) == 7  # the seven categories, NONE included
    assert sum(counts) == last["plugin/xdelta/explained"]
    # one example figure per category that has explained samples, in TensorBoard, as PNGs and in the HTML
    from fl.run_logger import image_path
    from tests.test_figures import assert_picture

    shown = sorted(tag.rsplit("/", 1)[1] for tag, v in last.items() if tag.startswith("plugin/xdelta/count/") and v)
    tags = sorted(t for t in events.Tags()["images"] if t.startswith("plugin/xdelta/examples/"))
    assert tags == [f"plugin/xdelta/examples/{c}" for c in shown]
    for category in shown:
        assert_picture(image_path(run_dir, "xdelta", f"examples/{category}", 1).read_bytes())
    assert _embedded_pngs(html_text) == len(shown)
    assert {"plugin/geometry/global/angle_vs_length", "plugin/geometry/global/margin_by_class"} <= set(events.Tags()["images"])
    assert_picture(image_path(run_dir, "geometry", "global/angle_vs_length", 1).read_bytes())
    assert [e.value for e in events.Scalars("plugin/geometry/global/scatter_points")] == [32.0, 32.0]  # rounds 0, 1


def test_the_plugin_refuses_a_delta_map_size_that_no_layer_has_before_round_1(tmp_path):
    from fl.errors import ConfigError
    from tests.helpers import run_inprocess
    from tests.test_delta_strategy import TINY

    with pytest.raises(ConfigError, match="plugins.xdelta.delta_map_size: no DELTA layer has a map of at least 64x64"):
        run_inprocess(tmp_path / "run", [
            "sim=delta_100clients", "num_clients=4", "fraction_fit=0.5", "rounds=1", f"model.cache_dir={tmp_path}/cache",
            "plugins=[xdelta]", "plugins.xdelta.delta_map_size=64", "tensorboard=false", *TINY])
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or (tmp_path / "run" / "metrics.jsonl").read_text() == ""



@pytest.mark.parametrize("pair, key", [
    ({"data": {"name": "synthetic"}, "seed": 0, "server_samples": 0}, "plugins.xdelta.pair.server_samples"),
    ({"data": {"name": "synthetic"}, "seed": 0, "nope": 1}, "plugins.xdelta.pair.nope"),
    ({"data": {"name": "synthetic"}, "seed": 0, "base_recipe": {"epochz": 2}}, "plugins.xdelta.pair.base_recipe"),
    ({"seed": 0}, "plugins.xdelta.pair"),
])
def test_a_bad_pair_option_is_refused_when_the_plugin_is_built(pair, key):
    """Plugins are built at config time, so this stops the run before any work (not at the run's end)."""
    from fl.errors import ConfigError
    from plugins.xdelta import XDelta

    with pytest.raises(ConfigError) as refused:
        XDelta(pair=pair)
    assert refused.value.key == key
