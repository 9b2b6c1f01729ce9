"""The offline default dataset: procedurally rendered 32x32 RGB scenes of objects made of parts.

Each class is an object (a body shape plus small parts at fixed places on it) seen in a context
(the background). In the default ten classes, eight fall into groups that differ only by a small
part of a few pixels (which eyes a disc has; a dot, a cross or a bar on a box or a diamond) and
one pair differs only by its context (the same object on ground or on any other background).
Everything else varies per sample: the object's position anywhere in the frame, its size and
aspect, the colours, clutter made of the very same part shapes, and pixel noise.

Reading a few-pixel part in relation to a small object that can sit anywhere favours a deep,
translation-invariant network over a shallow one with a position-specific dense head: this is
the capacity gap DELTA and XDelta need (bench/capacity_gap.py measures it).

`difficulty` in [0, 1] shrinks the objects and their parts, widens every jitter, and adds clutter,
noise and smaller look-alike decoy objects behind the main one. The shipped 0.5 is where the gap
was measured (radius about 4.2 px, parts of 1-2 px).

Every pixel and mask of sample i is a function of (seed, stream, i) alone: its random numbers come
from its own generator seeded with those words, and the vectorized rendering is elementwise, so
the same seed gives bit-identical images in any process and in any rendering order. Labels are
drawn up front; pixels are rendered lazily on the first `get` of an index and cached.

Memory does not grow with the set: a set of up to `DIRECT_CACHE` images caches every image it
renders (at most 192 MiB); a larger one (a federation of 10,000 or a million clients, whose
clients are sampled a hundred per round) keeps only the `RING_CACHE` most recently rendered images
and renders again on a miss, the same bytes. Its labels take the smallest unsigned dtype that holds
the classes (one byte per sample instead of eight) once there are more than `INT64_LABELS` of them.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch

from fl.data.imageset import ImageSet, _as_index
from fl.data.sources import DATASETS
from fl.errors import ConfigError

SIZE = 32
DEFAULT_DIFFICULTY = 0.5
# Measured over 20,000 training images at the default difficulty (in [0, 1] units); the std
# moves by about 0.01 between difficulty 0 and 1, and normalization only has to be roughly centred.
MEAN = (0.489, 0.508, 0.473)
STD = (0.224, 0.225, 0.237)

BODIES = ("disc", "box", "triangle", "diamond")
CONTEXTS = ("plain", "stripes", "ground")
STAMPS = ("dot", "cross", "hbar", "vbar")


@dataclass(frozen=True)
class Part:
    """A small mark on the object: a stamp drawn at (ax, ay) body radii from the body centre."""

    name: str
    stamp: str
    ax: float
    ay: float
    on_body: bool = True  # drawn in the contrasting part colour; off-body parts take the body colour


PARTS = (
    Part("left_eye", "dot", -0.42, -0.3),
    Part("right_eye", "dot", 0.42, -0.3),
    Part("spot", "dot", 0.0, 0.15),
    Part("cross_mark", "cross", 0.0, 0.15),
    Part("antenna", "vbar", 0.0, -1.15, on_body=False),
    Part("mouth", "hbar", 0.0, 0.42),
    Part("tail", "hbar", 1.1, 0.25, on_body=False),
)
# Part ids in part masks: 0 background, 1 body, 2.. the parts above.
PART_NAMES = ["background", "body"] + [p.name for p in PARTS]


@dataclass(frozen=True)
class SceneClass:
    """One class: a body, its parts and its context (None: any context, drawn per sample)."""

    name: str
    body: str
    parts: tuple[str, ...]
    context: str | None = None


# The ten default classes: three groups that differ only by a small part on the same body
# (0/1/2: which eyes; 3/4/5: a dot, a cross or a bar; 6/7: a dot or a cross) and one pair that
# differs only by its context (8/9: the same object on a plain background or on ground; the other
# classes appear on all three backgrounds).
CLASSES = (
    SceneClass("disc-left_eye", "disc", ("left_eye",)),
    SceneClass("disc-right_eye", "disc", ("right_eye",)),
    SceneClass("disc-both_eyes", "disc", ("left_eye", "right_eye")),
    SceneClass("box-spot", "box", ("spot",)),
    SceneClass("box-cross", "box", ("cross_mark",)),
    SceneClass("box-mouth", "box", ("mouth",)),
    SceneClass("diamond-spot", "diamond", ("spot",)),
    SceneClass("diamond-cross", "diamond", ("cross_mark",)),
    SceneClass("triangle-antenna", "triangle", ("antenna",), context="plain"),
    SceneClass("triangle-antenna@ground", "triangle", ("antenna",), context="ground"),
)
# Designed look-alikes: (class a, class b, what tells them apart).
CONFUSABLE_PAIRS = ((0, 1, "part"), (0, 2, "part"), (1, 2, "part"), (3, 4, "part"), (3, 5, "part"),
                    (4, 5, "part"), (6, 7, "part"), (8, 9, "context"))

_CLUTTER = 10  # clutter slots per image; difficulty sets how many are used
_DECOYS = 2  # slots for smaller look-alike objects behind the main one
_NUM_UNIFORMS = 40 + 2 * len(PARTS) + 9 * _CLUTTER + 10 * _DECOYS  # drawn per sample; changing it changes every image
_LABEL_TAG = 0x1ABE1
_PIXEL_TAG = 0x91CE1
DIRECT_CACHE = 1 << 16  # sets up to this many images cache every image (3 KiB each: 192 MiB at most)
RING_CACHE = 1 << 14  # larger sets keep this many recently rendered images (48 MiB)
INT64_LABELS = 1 << 22  # up to this many labels stay int64 (32 MiB); more take uint8/uint16
_LABEL_CHUNK = 1 << 20  # labels are drawn this many at a time (the same stream as one draw)
_BYTES_PER_SAMPLE = 6  # resident per training sample at most: a label, a partition index, a check byte


def scene_classes(num_classes: int) -> tuple[SceneClass, ...]:
    """The first `num_classes` classes: the designed ten, then further body/part/context combinations."""
    if num_classes <= len(CLASSES):
        return CLASSES[:num_classes]
    extra_parts = [p.name for p in PARTS] + ["left_eye+right_eye", "spot+tail", "antenna+mouth"]
    taken = {(c.body, c.parts, c.context) for c in CLASSES}
    any_context = {(c.body, c.parts) for c in CLASSES if c.context is None}
    table = list(CLASSES)
    for body, parts, context in product(BODIES, extra_parts, CONTEXTS):
        key = (body, tuple(parts.split("+")), context)
        # an object already shown on every background cannot also be a context-specific class
        if key not in taken and key[:2] not in any_context and len(table) < num_classes:
            table.append(SceneClass(f"{body}-{parts}@{context}", *key))
    return tuple(table)


class SyntheticImageSet(ImageSet):
    """Rendered part-based scenes; pixels cached on first read, masks re-rendered on request."""

    has_masks = True

    def __init__(self, size: int, seed: int, *, stream: int = 0, num_classes: int = 10,
                 difficulty: float = DEFAULT_DIFFICULTY, name: str = "synthetic"):
        max_classes = len(scene_classes(10_000))
        if not 2 <= num_classes <= max_classes:
            raise ConfigError("data.num_classes", f"must be in [2, {max_classes}], got {num_classes}")
        if not 0.0 <= difficulty <= 1.0:
            raise ConfigError("data.difficulty", f"must be in [0, 1], got {difficulty}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.seed, self.stream, self.difficulty = int(seed), int(stream), float(difficulty)
        self.classes = scene_classes(num_classes)
        self.class_names = [c.name for c in self.classes]
        self.part_names = list(PART_NAMES)
        self.parts_of_class = [("body",) + c.parts for c in self.classes]
        _check_fits(size, name)
        self._init_meta(_draw_labels(size, num_classes, [self.seed, self.stream, _LABEL_TAG]), num_classes, 3, SIZE,
                        MEAN, STD, name)
        self._renderer = _Renderer(self.classes, self.difficulty)
        if size <= DIRECT_CACHE:
            self._array = np.empty((size, 3, SIZE, SIZE), dtype=np.uint8)  # pages are touched on first render
            self._pixels = torch.from_numpy(self._array)
            self._rendered = np.zeros(size, dtype=bool)
            self._ring = None
        else:
            self._ring = _RingCache(RING_CACHE)

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        if self._ring is not None:
            return self._ring.gather(idx, lambda missing: self._render(missing)[0])
        missing = np.unique(idx[~self._rendered[idx]])
        if len(missing):
            # Two threads may render the same index at once; both write identical bytes, and the
            # flag is raised only after the pixels are in place.
            self._array[missing] = self._render(missing)[0]
            self._rendered[missing] = True
        return self._array[idx]

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().get(indices)
        return x, y.long()  # compact labels of a large set leave as int64 like every other set's

    def masks(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Object mask bool [B, H, W] and part mask int64 [B, H, W] (ids index `part_names`)."""
        idx = _as_index(indices, len(self))
        part_mask = torch.from_numpy(self._render(idx)[1].astype(np.int64))
        return part_mask > 0, part_mask

    def render(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Render without caching: uint8 images [B, 3, H, W] and uint8 part ids [B, H, W]."""
        return self._render(_as_index(indices, len(self)))

    def _render(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        uniforms = np.empty((len(idx), _NUM_UNIFORMS))
        noise = np.empty((len(idx), 3, SIZE, SIZE), dtype=np.float32)
        for row, i in enumerate(idx):
            rng = np.random.default_rng([self.seed, self.stream, _PIXEL_TAG, int(i)])
            uniforms[row] = rng.random(_NUM_UNIFORMS)
            rng.random(dtype=np.float32, out=noise[row])
        return self._renderer(self.labels[idx], uniforms, noise)


def _draw_labels(size: int, num_classes: int, seed_words: list[int]) -> np.ndarray:
    """`default_rng(seed_words).integers(num_classes, size=size)`, drawn in chunks (the generator
    continues its stream across calls, so the values are the same) into int64 for a set of up to
    `INT64_LABELS` samples and into the smallest unsigned dtype that holds the classes above that."""
    rng = np.random.default_rng(seed_words)
    if size <= INT64_LABELS:
        return rng.integers(num_classes, size=size)
    labels = np.empty(size, dtype=np.uint8 if num_classes <= 256 else np.uint16)
    for start in range(0, size, _LABEL_CHUNK):
        stop = min(start + _LABEL_CHUNK, size)
        labels[start:stop] = rng.integers(num_classes, size=stop - start)
    return labels


def _check_fits(size: int, name: str) -> None:
    """Refuse, as a MemoryError, a set whose labels and partition indices alone exceed this machine's memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): let the allocation decide
        return
    need = size * _BYTES_PER_SAMPLE
    if need > total:
        raise MemoryError(f"{name}: {size:,} samples need about {need / 2**30:.0f} GiB for their labels and "
                          f"partition indices; this machine has {total / 2**30:.0f} GiB")


class _RingCache:
    """The last `capacity` rendered images by sample index; a miss is rendered again (same bytes).

    Slots are reused in order (a ring), so memory is one fixed [capacity, 3, H, W] array and a dict
    of `capacity` entries. Rendering happens outside the lock: two threads may render the same
    index at once, and the first to store it wins (both have identical bytes).
    """

    def __init__(self, capacity: int):
        self.pixels = np.empty((capacity, 3, SIZE, SIZE), dtype=np.uint8)
        self.owner = np.full(capacity, -1, dtype=np.int64)  # sample index held by each slot
        self.slot_of: dict[int, int] = {}
        self.next_slot = 0
        self.lock = threading.Lock()

    def gather(self, idx: np.ndarray, render) -> np.ndarray:
        out = np.empty((len(idx), 3, SIZE, SIZE), dtype=np.uint8)
        with self.lock:
            slots = np.fromiter((self.slot_of.get(i, -1) for i in idx.tolist()), dtype=np.int64, count=len(idx))
            hit = slots >= 0
            out[hit] = self.pixels[slots[hit]]
        if hit.all():
            return out
        missing, where = np.unique(idx[~hit], return_inverse=True)
        rendered = render(missing)
        out[~hit] = rendered[where]
        keep = slice(max(len(missing) - len(self.owner), 0), None)  # a batch larger than the ring keeps its tail
        with self.lock:
            for i, image in zip(missing[keep].tolist(), rendered[keep]):
                if i in self.slot_of:
                    continue
                slot = self.next_slot
                self.next_slot = (slot + 1) % len(self.owner)
                if self.owner[slot] >= 0:
                    del self.slot_of[int(self.owner[slot])]
                self.owner[slot] = i
                self.slot_of[i] = slot
                self.pixels[slot] = image
        return out


class _Draws:
    """Hands out the per-sample uniform columns in a fixed order."""

    def __init__(self, uniforms: np.ndarray):
        self.u, self.k = uniforms, 0

    def __call__(self, n: int | None = None) -> np.ndarray:
        width = 1 if n is None else n
        assert self.k + width <= self.u.shape[1], "raise _NUM_UNIFORMS"
        cols = self.u[:, self.k:self.k + width]
        self.k += width
        return (cols[:, 0] if n is None else cols).astype(np.float32)


def _span(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.float32(lo) + u * np.float32(hi - lo)


class _Renderer:
    """Vectorized painter of a batch of scenes from their labels and per-sample random numbers.

    Only elementwise arithmetic and comparisons touch per-sample data, so each image comes out
    bit-identical whatever batch it is rendered in. Painting order: background and context,
    clutter, decoys, the object's body, its parts, noise.
    """

    def __init__(self, classes: tuple[SceneClass, ...], difficulty: float):
        d = difficulty
        self.body = np.array([BODIES.index(c.body) for c in classes])
        self.has_part = np.array([[p.name in c.parts for p in PARTS] for c in classes])
        self.context = np.array([-1 if c.context is None else CONTEXTS.index(c.context) for c in classes])
        off_body = {p.name for p in PARTS if not p.on_body}
        self.sticks_out = np.array([bool(off_body & set(c.parts)) for c in classes])
        self.part_x = np.array([p.ax for p in PARTS], dtype=np.float32)
        self.part_y = np.array([p.ay for p in PARTS], dtype=np.float32)
        self.part_stamp = np.array([STAMPS.index(p.stamp) for p in PARTS])
        self.part_on_body = np.array([p.on_body for p in PARTS])
        self.radius = 5.0 - 1.6 * d  # body radius in pixels, before jitter
        self.scale = 0.12 + 0.35 * d  # relative radius jitter
        self.aspect = 0.08 + 0.27 * d
        self.part_size = max(0.5, 0.95 - 0.64 * d)  # half-size of a dot in pixels (0.5: one pixel at least)
        self.part_shift = 0.06 + 0.16 * d  # part placement jitter, body radii
        self.clutter_rate = min(1.0, 0.25 + 0.96 * d)
        self.decoy_rate = 0.72 * d
        self.noise = (0.02 + 0.128 * d) * 3 ** 0.5  # uniform noise with this standard deviation
        coords = np.arange(SIZE, dtype=np.float32) + np.float32(0.5)
        self.x = coords[None, None, :]
        self.y = coords[None, :, None]

    def __call__(self, labels: np.ndarray, uniforms: np.ndarray, noise: np.ndarray):
        draw = _Draws(uniforms)
        batch = len(labels)
        f32 = np.float32

        # 1. background: a tinted colour with a linear gradient, then the context layer
        bg_l = _span(draw(), 0.15, 0.85)
        bg = np.clip(bg_l[:, None] + _span(draw(3), -0.15, 0.15), 0, 1)
        gx, gy = _span(draw(), -0.008, 0.008), _span(draw(), -0.008, 0.008)
        ramp = gx[:, None, None] * (self.x - f32(16)) + gy[:, None, None] * (self.y - f32(16))
        img = bg[:, :, None, None] + ramp[:, None]

        context = self.context[labels]
        drawn = np.minimum((draw() * len(CONTEXTS)).astype(np.int64), len(CONTEXTS) - 1)
        context = np.where(context < 0, drawn, context)
        period = _span(draw(), 3.5, 6.0)[:, None, None]
        phase = draw()[:, None, None] * period
        amplitude = _span(draw(), 0.12, 0.22) * np.where(bg_l > 0.5, f32(-1), f32(1))
        stripes = (context == 1)[:, None, None] & ((self.y + phase) % period < period / 2)
        img = img + np.where(stripes[:, None], amplitude[:, None, None, None], f32(0))
        horizon = _span(draw(), 21.0, 27.0)
        ground_rgb = np.stack([_span(draw(), 0.25, 0.55), _span(draw(), 0.45, 0.75), _span(draw(), 0.1, 0.3)], 1)
        ground = (context == 2)[:, None, None] & (self.y > horizon[:, None, None])
        img = np.where(ground[:, None], ground_rgb[:, :, None, None], img)

        # 2. object geometry (anywhere in the frame, whole) and colours
        radius = f32(self.radius) * (f32(1) + _span(draw(), -self.scale, self.scale))
        sx = f32(1) + _span(draw(), -self.aspect, self.aspect)
        sy = f32(1) / sx
        stretch = radius * np.maximum(sx, sy)
        # bodies reach 1.1 radii from their centre, antenna and tail further
        extent = np.where(self.sticks_out[labels], f32(1.3) * stretch + f32(2.5), f32(1.1) * stretch + f32(0.5))
        cx = extent + draw() * (f32(SIZE) - 2 * extent)
        cy = extent + draw() * (f32(SIZE) - 2 * extent)
        body_l = bg_l + np.where(bg_l < 0.5, f32(1), f32(-1)) * _span(draw(), 0.3, 0.45)
        body_rgb = np.clip(body_l[:, None] + _span(draw(3), -0.25, 0.25), 0, 1)
        part_l = np.clip(body_l + np.where(body_l > 0.5, f32(-1), f32(1)) * _span(draw(), 0.35, 0.55), 0.02, 0.98)
        part_rgb = np.clip(part_l[:, None] + _span(draw(3), -0.08, 0.08), 0, 1)
        part_jitter = _span(draw(2 * len(PARTS)), -self.part_shift, self.part_shift)
        part_size = np.full(batch, self.part_size, dtype=f32)

        # 3. clutter: the part shapes and small blobs, half of them in the part colour
        c_on = draw(_CLUTTER) < self.clutter_rate
        c_kind = np.minimum((draw(_CLUTTER) * (len(STAMPS) + 1)).astype(np.int64), len(STAMPS))
        c_x, c_y = draw(_CLUTTER) * f32(SIZE), draw(_CLUTTER) * f32(SIZE)
        c_size = _span(draw(_CLUTTER), self.part_size, self.part_size + 1.3)
        c_like_part = draw(_CLUTTER) < 0.5
        c_rgb = np.stack([draw(_CLUTTER), draw(_CLUTTER), draw(_CLUTTER)], -1)
        c_rgb = np.where(c_like_part[..., None], part_rgb[:, None, :], c_rgb)
        _paint(img, None, np.where(c_on, c_kind, -1), c_x, c_y, c_size, c_rgb)

        # 4. decoys: smaller bodies of any shape with one on-body part
        on_body = np.flatnonzero(self.part_on_body)
        for _ in range(_DECOYS):
            d_on = draw() < self.decoy_rate
            d_body = np.minimum((draw() * len(BODIES)).astype(np.int64), len(BODIES) - 1)
            d_r = radius * f32(0.6)
            d_x, d_y = draw() * f32(SIZE), draw() * f32(SIZE)
            d_l = _span(draw(), 0.1, 0.9)
            d_rgb = np.clip(d_l[:, None] + _span(draw(3), -0.25, 0.25), 0, 1)
            d_part = on_body[np.minimum((draw() * len(on_body)).astype(np.int64), len(on_body) - 1)]
            d_part_l = np.where(d_l > 0.5, f32(0.15), f32(0.85)) + _span(draw(), -0.1, 0.1)
            d_part_rgb = np.repeat(d_part_l[:, None], 3, axis=1)
            if not d_on.any():
                continue
            shape = _bodies(d_body, d_on, (self.x - d_x[:, None, None]) / d_r[:, None, None],
                            (self.y - d_y[:, None, None]) / d_r[:, None, None])
            img = np.where(shape[:, None], d_rgb[:, :, None, None], img)
            kind = np.where(d_on, self.part_stamp[d_part], -1)
            _paint(img, None, kind[:, None], (d_x + self.part_x[d_part] * d_r)[:, None],
                   (d_y + self.part_y[d_part] * d_r)[:, None], part_size[:, None], d_part_rgb[:, None])

        # 5. the object: body, then its parts on top
        u = (self.x - cx[:, None, None]) / (radius * sx)[:, None, None]
        v = (self.y - cy[:, None, None]) / (radius * sy)[:, None, None]
        body = _bodies(self.body[labels], np.ones(batch, dtype=bool), u, v)
        part_mask = body.astype(np.uint8)
        img = np.where(body[:, None], body_rgb[:, :, None, None], img)
        px = cx[:, None] + (self.part_x + part_jitter[:, 0::2]) * (radius * sx)[:, None]
        py = cy[:, None] + (self.part_y + part_jitter[:, 1::2]) * (radius * sy)[:, None]
        kind = np.where(self.has_part[labels], self.part_stamp, -1)
        rgb = np.where(self.part_on_body[None, :, None], part_rgb[:, None, :], body_rgb[:, None, :])
        sizes = np.broadcast_to(part_size[:, None], kind.shape)
        _paint(img, part_mask, kind, px, py, sizes, rgb, 2 + np.arange(len(PARTS)))

        # 6. sensor noise
        img += f32(self.noise) * (f32(2) * noise - f32(1))
        pixels = np.rint(np.clip(img, 0, 1) * f32(255)).astype(np.uint8)
        return pixels, part_mask


def _bodies(body_ids: np.ndarray, active: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Silhouettes [B, H, W] of each row's body shape (rows not active stay empty)."""
    mask = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for b, shape in enumerate(BODIES):
        rows = active & (body_ids == b)
        if rows.any():
            mask[rows] = _body(shape, u[rows], v[rows])
    return mask


_WINDOW = np.arange(-3, 4)  # every stamp fits in a 7x7 window around its centre


def _paint(img, part_mask, kind, px, py, size, rgb, part_id=None) -> None:
    """Paint K stamps per image in place, later stamps over earlier ones.

    kind, px, py, size: [B, K] (kind indexes STAMPS, len(STAMPS) is a blob, -1 is nothing);
    rgb: [B, K, 3]; part_id: [K] ids written to part_mask where given.
    """
    batch, k = kind.shape
    kind, px, py, size = kind.ravel(), px.ravel(), py.ravel(), size.ravel()
    jx = np.floor(px).astype(np.int64)[:, None, None] + _WINDOW[None, None, :]
    jy = np.floor(py).astype(np.int64)[:, None, None] + _WINDOW[None, :, None]
    dx = (jx.astype(np.float32) + np.float32(0.5)) - px[:, None, None]
    dy = (jy.astype(np.float32) + np.float32(0.5)) - py[:, None, None]
    mark = np.zeros((len(kind), len(_WINDOW), len(_WINDOW)), dtype=bool)
    for s, stamp in enumerate(STAMPS + ("blob",)):
        rows = kind == s
        if rows.any():
            mark[rows] = _stamp(stamp, dx[rows], dy[rows], size[rows, None, None])
    mark &= (jx >= 0) & (jx < SIZE) & (jy >= 0) & (jy < SIZE)
    item, wy, wx = np.nonzero(mark)
    if item.size == 0:
        return
    ys, xs = jy[item, wy, 0], jx[item, 0, wx]
    b, slot = np.divmod(item, k)
    # where stamps overlap keep the last slot: sort by pixel then slot, keep each pixel's last entry
    pixel = (b * SIZE + ys) * SIZE + xs
    order = np.lexsort((slot, pixel))
    last = order[np.append(pixel[order][1:] != pixel[order][:-1], True)]
    b, slot, ys, xs = b[last], slot[last], ys[last], xs[last]
    img[b, :, ys, xs] = rgb[b, slot]
    if part_mask is not None:
        part_mask[b, ys, xs] = np.asarray(part_id)[slot]


def _body(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Body silhouettes in body-radius units (u right, v down)."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "box":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":
        return (v <= 0.8) & (np.abs(u) <= 0.55 * (v + 0.95))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.1
    raise ValueError(shape)


def _stamp(stamp: str, dx: np.ndarray, dy: np.ndarray, s) -> np.ndarray:
    """Small marks of half-size `s` pixels around the origin of (dx, dy)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if stamp == "dot":
        return (ax <= s) & (ay <= s)
    if stamp == "cross":
        return ((ax <= 0.5) & (ay <= s + 1)) | ((ay <= 0.5) & (ax <= s + 1))
    if stamp == "hbar":
        return (ay <= 0.5) & (ax <= s + 1.5)
    if stamp == "vbar":
        return (ax <= 0.5) & (ay <= s + 1.5)
    if stamp == "blob":
        return ax * ax + ay * ay <= s * s
    raise ValueError(stamp)


@DATASETS.register("synthetic")
def synthetic(*, num_clients: int, seed: int, root: str | None = None, samples_per_client: int = 50,
              test_size: int = 2000, difficulty: float = DEFAULT_DIFFICULTY,
              num_classes: int = 10) -> tuple[SyntheticImageSet, SyntheticImageSet]:
    """`num_clients * samples_per_client` training scenes and `test_size` test scenes from a
    separate stream of the same seed; `root` is unused (nothing is read from disk)."""
    if samples_per_client < 1:
        raise ConfigError("data.samples_per_client", f"must be >= 1, got {samples_per_client}")
    if test_size < 1:
        raise ConfigError("data.test_size", f"must be >= 1, got {test_size}")
    options = dict(num_classes=num_classes, difficulty=difficulty)
    train = SyntheticImageSet(num_clients * samples_per_client, seed, stream=0, name="synthetic/train", **options)
    test = SyntheticImageSet(test_size, seed, stream=1, name="synthetic/test", **options)
    return train, test
