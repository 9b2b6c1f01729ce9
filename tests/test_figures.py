"""fl.figures: every drawing function gives a non-blank image that Pillow decodes, the scatter's
point count is read back from the figure, and the run logger puts a report's images both in
TensorBoard and as PNG files in the run directory."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fl import figures
from fl.hooks import Report
from fl.run_logger import RunLogger, image_path

MIN_STD = 10.0  # grey-level standard deviation of a real figure (a blank canvas has 0)


def assert_picture(data: bytes | np.ndarray) -> np.ndarray:
    """Decode with Pillow (bytes) and check that the image is RGB, not tiny, and not blank."""
    if isinstance(data, (bytes, bytearray)):
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.format == "PNG"
            data = np.asarray(img.convert("RGB"))
    assert data.dtype == np.uint8 and data.ndim == 3 and data.shape[2] == 3
    assert data.shape[0] >= 100 and data.shape[1] >= 100
    assert data.std() > MIN_STD, data.std()
    return data


def _geometry(n=120, classes=4, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    correct = rng.random(n) < 0.7
    angle = np.where(correct, 40.0, 70.0) + rng.normal(0, 5, n) + shift
    length = np.where(correct, 6.0, 4.0) + rng.normal(0, 1, n)
    margin = np.where(correct, 1.0, -1.0) * np.abs(rng.normal(0.5, 0.3, n))
    return figures.FeatureGeometry(length, angle, margin, labels, correct)


NAMES = ["cat", "dog", "ship", "frog"]


def test_scatter_draws_one_point_per_sample_with_a_finite_angle():
    a, b = _geometry(), _geometry(seed=1, shift=4.0)
    fig = figures.angle_length_scatter({"dense": a, "pruned": b}, NAMES)
    assert figures.scatter_points(fig) == len(a) + len(b)
    assert_picture(figures.png_bytes(figures.to_rgb(fig)))
    a.angle[:3] = np.nan  # zero feature vectors have no direction: no point
    fig = figures.angle_length_scatter({"dense": a}, NAMES)
    assert figures.scatter_points(fig) == len(a) - 3
    fig = figures.angle_length_scatter({"dense": a}, NAMES, max_classes=2)  # classes 0 and 1 only
    assert figures.scatter_points(fig) == int(np.isfinite(a.angle[a.labels < 2]).sum())
    figures.to_rgb(fig)


def test_every_figure_is_a_picture_with_labels_and_a_legend():
    a, b = _geometry(), _geometry(seed=1)
    b = figures.FeatureGeometry(b.length, b.angle, b.margin, a.labels, b.correct)
    point = figures.TradeoffPoint
    made = {
        "margin": figures.margin_boxes({"dense": a, "pruned": b}, NAMES),
        "shift": figures.geometry_shift(a, b, NAMES, after_name="client 3"),
        "tradeoff": figures.accuracy_tradeoff({"dense": [point(4e5, 5e6, 0.8)],
                                               "structured": [point(1e5, 1e6, 0.6, "75%"), point(2e5, 2e6, 0.7, "50%")]}),
        "line": figures.line_chart({"a": ([1, 2, 3], [0.1, 0.5, 0.7])}, xlabel="round", ylabel="accuracy"),
    }
    for name, fig in made.items():
        axes = [ax for ax in fig.get_axes() if ax.get_xlabel()]
        assert axes, name
        assert all(ax.get_ylabel() for ax in axes), name
        assert any(ax.get_legend() is not None for ax in fig.get_axes()) or fig.legends, name
        assert_picture(figures.to_rgb(fig))


def test_shift_refuses_different_samples():
    a, b = _geometry(), _geometry(seed=1)
    with pytest.raises(ValueError, match="same samples"):
        figures.geometry_shift(a, b.subset(np.arange(len(b)) < 50), NAMES)


def test_map_rows_show_the_outlined_regions():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    rows = []
    for i in range(3):
        edge = np.exp(-((xx - 4) ** 2 + (yy - 5) ** 2) / 10.0)
        delta = np.exp(-((xx - 11) ** 2 + (yy - 10) ** 2) / 8.0)
        rows.append(figures.MapExample(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), edge, delta, edge > 0.5,
                                       delta > 0.5, f"#{i} cat\nedge: dog"))
    fig = figures.map_examples(rows, title="LOCAL_COMPLEMENT")
    assert len([ax for ax in fig.get_axes() if ax.get_visible()]) == 3 * 4 + 1  # + the colour bar
    with_outline = assert_picture(figures.to_rgb(fig))
    empty = [figures.MapExample(r.image, r.edge_map, r.delta_map, np.zeros((16, 16), bool), np.zeros((16, 16), bool),
                                r.caption) for r in rows]
    without = figures.to_rgb(figures.map_examples(empty, title="LOCAL_COMPLEMENT"))
    assert with_outline.shape == without.shape and (with_outline != without).any(axis=2).sum() > 200


def test_the_logger_writes_images_to_tensorboard_and_as_png_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    image = figures.to_rgb(figures.line_chart({"a": ([0, 1], [0, 1])}, xlabel="x (s)", ylabel="y (m)"))
    logger = RunLogger(tmp_path)
    logger.log_report("demo", Report(images={"curves/a": image}), 3)
    logger.close()
    path = image_path(tmp_path, "demo", "curves/a", 3)
    assert path == tmp_path / "images" / "demo" / "curves-a_round0003.png"
    np.testing.assert_array_equal(assert_picture(path.read_bytes()), image)  # lossless
    events = EventAccumulator(str(tmp_path), size_guidance={IMAGES: 0}).Reload()
    assert events.Tags()["images"] == ["plugin/demo/curves/a"]
    stored = events.Images("plugin/demo/curves/a")
    assert [e.step for e in stored] == [3] and (stored[0].width, stored[0].height) == (image.shape[1], image.shape[0])
    assert_picture(stored[0].encoded_image_string)


def test_the_logger_writes_png_files_without_tensorboard(tmp_path):
    image = figures.to_rgb(figures.line_chart({"a": ([0, 1], [0, 1])}, xlabel="x (s)", ylabel="y (m)"))
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log_report("demo", Report(images={"a": image}), 0)
    logger.close()
    assert_picture(image_path(tmp_path, "demo", "a", 0).read_bytes())
    assert not list(tmp_path.glob("events.out.tfevents.*"))
