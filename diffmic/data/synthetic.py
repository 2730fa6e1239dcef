"""A synthetic, file-free classification set whose class evidence sits in a few small local regions.

Each image is a textured, noisy, greyish background with a handful of small sharp blobs (~8-10 px at 64 px):
three class-bearing blobs drawn in the class's shape (disc, ring, plus, ...) and the class's palette colour, plus
one or two neutral speckle patches (clutter shared by all classes). Under the sharp blobs lie faint, wide spots in
every *other* palette colour, each covering as much area as the class blobs together, so that every palette colour
covers about the same area in every image: mean colour (or any global colour statistic that ignores sharpness and
shape) carries almost no class signal, and a model must look at the blobs. Shapes survive flips and +-30 degree
rotations; blobs are kept inside the inscribed disc so rotation never cuts them off.

Labels are balanced and fixed by index (label = index % num_classes); pixels come lazily and deterministically from
`np.random.default_rng([seed, split_id, index])`.
"""
from __future__ import annotations

import numpy as np

# name of each class shape, in class-index order; `num_classes` may use at most this many
CLASS_SHAPES = (
    "disc", "ring", "plus", "hollow_square", "target", "x_cross",
    "filled_square", "dots", "triangle", "checker", "bar_pair", "half_disc",
)
MAX_CLASSES = len(CLASS_SHAPES)
_SPOT_PEAK = 0.3  # peak opacity of a colour-balancing spot
_MAX_SPOTS = 9
_N_CLASS_BLOBS = 3
_BASE = 64  # geometry below is in pixels of a 64 px canvas and scales with the image size


def class_names(num_classes: int) -> list[str]:
    return [f"{i}_{CLASS_SHAPES[i]}" for i in range(num_classes)]


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) saturated RGB colours at evenly spaced hues."""
    h = (np.arange(num_classes) / num_classes + 0.08) % 1.0
    rgb = np.clip(np.abs((h[:, None] * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)  # HSV -> RGB, S=V=1
    return 40 + 180 * rgb


def label_of(index: int | np.ndarray, num_classes: int):
    """Labels are balanced and fixed by index: index i has label i % num_classes."""
    return index % num_classes


def _shape_alpha(shape: str, dy: np.ndarray, dx: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of one blob on a grid of offsets (dy, dx) from its centre, radius r (pixels)."""
    d = np.hypot(dy, dx)
    ady, adx = np.abs(dy), np.abs(dx)
    box = np.maximum(ady, adx)
    w = max(1.5, 0.32 * r)  # stroke width
    if shape == "disc":
        m = d <= r
    elif shape == "ring":
        m = (d <= r) & (d >= r - 1.2 * w)
    elif shape == "plus":
        m = ((ady <= w / 2 + 0.3) | (adx <= w / 2 + 0.3)) & (box <= r)
    elif shape == "hollow_square":
        m = (box <= 0.85 * r) & (box >= 0.85 * r - w)
    elif shape == "target":
        m = (d <= 0.35 * r) | ((d <= r) & (d >= r - w))
    elif shape == "x_cross":
        m = ((np.abs(dy - dx) <= w * 0.75) | (np.abs(dy + dx) <= w * 0.75)) & (d <= r)
    elif shape == "filled_square":
        m = box <= 0.75 * r
    elif shape == "dots":
        c = 0.5 * r
        m = np.hypot(ady - c, adx - c) <= 0.35 * r
    elif shape == "triangle":
        m = (dy <= 0.6 * r) & (dy >= -r + 2 * adx * 0.9) & (d <= 1.2 * r)
    elif shape == "checker":
        m = (box <= 0.8 * r) & (((dy >= 0) ^ (dx >= 0)))
    elif shape == "bar_pair":
        m = (box <= 0.85 * r) & (np.abs(ady - 0.5 * r) <= w / 2 + 0.2)
    elif shape == "half_disc":
        m = (d <= r) & (dy >= 0)
    elif shape == "speckle":
        return ((d <= r) & (rng.random(d.shape) < 0.4)).astype(np.float32) * 0.9
    else:  # pragma: no cover - guarded by MAX_CLASSES
        raise KeyError(shape)
    return m.astype(np.float32)


def _place(rng: np.random.Generator, n: int, size: int, r: float) -> list[tuple[float, float]]:
    """n blob centres inside the inscribed disc (rotation keeps them), kept apart from each other."""
    centres: list[tuple[float, float]] = []
    lim = 0.5 * size - r - 2 * size / _BASE
    min_gap = 2.6 * r
    for attempt in range(600):
        if len(centres) == n:
            break
        y, x = rng.uniform(-lim, lim, 2)
        if y * y + x * x > lim * lim:
            continue
        gap = min_gap if attempt < 400 else 0.0  # crowded: give up on spacing rather than on blobs
        if all((y - cy) ** 2 + (x - cx) ** 2 >= gap**2 for cy, cx in centres):
            centres.append((y, x))
    return [(y + 0.5 * size, x + 0.5 * size) for y, x in centres]


def render(seed: int, split_id: int, index: int, num_classes: int, size: int = 64) -> np.ndarray:
    """The uint8 RGB image (size, size, 3) for item `index` of split `split_id`; its label is `label_of(index)`."""
    rng = np.random.default_rng([seed, split_id, index])
    label = int(label_of(index, num_classes))
    k = size / _BASE

    # background: per-image colour, low-frequency texture, pixel noise
    base = rng.uniform(80, 175) + rng.normal(0.0, 12.0, 3)  # greyish, tinted
    coarse = rng.normal(0.0, 18.0, (6, 6, 1)) + rng.normal(0.0, 8.0, (6, 6, 3))
    yy = np.linspace(0, 5, size)
    y0 = np.clip(np.floor(yy).astype(int), 0, 4)
    f = (yy - y0)[:, None]
    rows = coarse[y0] * (1 - f)[..., None] + coarse[y0 + 1] * f[..., None]  # (size, 6, 3)
    tex = rows[:, y0] * (1 - f.T)[..., None] + rows[:, y0 + 1] * f.T[..., None]  # (size, size, 3)
    img = base + tex + rng.normal(0.0, 10.0, (size, size, 3))

    pal = palette(num_classes)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    def paint(alpha: np.ndarray, colour: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        a = alpha[..., None]
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch * (1 - a) + (colour + rng.normal(0, 6.0, patch.shape)) * a

    def window(cy: float, cx: float, half: float) -> tuple[int, int, int, int]:
        y0, x0 = max(0, int(cy - half)), max(0, int(cx - half))
        return y0, min(size, int(cy + half) + 2), x0, min(size, int(cx + half) + 2)

    # sharp blobs: the class-bearing ones (class shape in palette colour `label`) and neutral speckle clutter
    sharp = [CLASS_SHAPES[label]] * _N_CLASS_BLOBS + ["speckle"] * int(rng.integers(1, 3))
    centres = _place(rng, len(sharp), size, 5.0 * k)  # class blobs first: they are never the ones left out
    layers, class_mass = [], 0.0
    for shape, (cy, cx) in zip(sharp, centres):
        r = rng.uniform(4.0, 5.0) * k
        y0, y1, x0, x1 = window(cy, cx, 1.3 * r)
        a = _shape_alpha(shape, yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx, r, rng) * 0.92
        if shape == "speckle":
            colour = (rng.uniform(15, 55) if rng.random() < 0.5 else rng.uniform(200, 240)) + rng.normal(0, 10, 3)
        else:
            colour, class_mass = pal[label] + rng.normal(0, 10, 3), class_mass + float(a.sum())
        layers.append((a, colour, y0, y1, x0, x1))

    # colour balance: one faint, wide spot per other palette colour (at most _MAX_SPOTS of them, then each colour
    # covers that area in expectation), painted under the sharp blobs, each as much coverage as all class blobs
    others = np.array([c for c in range(num_classes) if c != label])
    spots = rng.permutation(others)[:_MAX_SPOTS]
    mass = class_mass * len(others) / max(1, len(spots))
    sigma = np.sqrt(mass / (2 * np.pi * _SPOT_PEAK))
    for c in spots:
        cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
        y0, y1, x0, x1 = window(cy, cx, 3 * sigma)
        d2 = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2
        paint(_SPOT_PEAK * np.exp(-0.5 * d2 / sigma**2), pal[c] + rng.normal(0, 10, 3), y0, y1, x0, x1)
    for layer in layers:
        paint(*layer)
    return np.clip(img, 0, 255).astype(np.uint8)
