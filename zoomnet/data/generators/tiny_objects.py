"""Synthetic tiny-object images: a textured, tissue-like background with a few small objects.

The label is positive iff a *target* object (a ring) is present; every image also holds
*distractors* (filled discs of the same colour and size), so the label cannot be read off a
blob detector at low resolution: the model must zoom in to see the ring's hole. Masks mark
the target objects, so training can report how often sampled sub-tiles hit them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zoomnet.data.examples import Example
from zoomnet.sources.array import ArraySource


@dataclass
class TinyObjects:
    """Settings of the tiny-object set.

    Attributes:
        size: image side in pixels.
        object_size: (min, max) object diameter in pixels.
        targets: (min, max) target objects in a positive image.
        distractors: (min, max) distractor objects in any image.
        ring_width: ring thickness in pixels.
        clutter: small dark specks per 100x100 pixels (background texture).
    """

    size: int = 512
    object_size: tuple[int, int] = (24, 32)
    targets: tuple[int, int] = (1, 2)
    distractors: tuple[int, int] = (1, 3)
    ring_width: int = 6
    clutter: float = 4.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    coarse = torch.from_numpy(rng.standard_normal((1, channels, cells, cells)).astype(np.float32))
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fine[0].permute(1, 2, 0).numpy()  # (size, size, channels)


def _background(rng: np.random.Generator, size: int, clutter: float) -> np.ndarray:
    base = np.array([225.0, 170.0, 200.0])  # eosin pink
    img = base + 12 * _smooth_noise(rng, size, max(2, size // 64), 3)
    img += 10 * _smooth_noise(rng, size, max(2, size // 8), 1)
    img += 6 * rng.standard_normal((size, size, 1))
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(clutter * (size / 100) ** 2)):  # small specks, like scattered nuclei
        cy, cx = rng.integers(0, size, 2)
        r = rng.uniform(1.5, 3.5)
        y0, y1, x0, x1 = max(cy - 4, 0), min(cy + 5, size), max(cx - 4, 0), min(cx + 5, size)
        d = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 <= r * r
        img[y0:y1, x0:x1][d] = [150.0, 90.0, 160.0]
    return img


def _place(rng, size, diameter, taken) -> tuple[int, int] | None:
    for _ in range(50):
        cy, cx = rng.integers(diameter, size - diameter, 2)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (diameter + d) ** 2 for y, x, d in taken):
            return int(cy), int(cx)
    return None


def _draw(img, mask, rng, cy, cx, diameter, ring_width, is_target):
    r = diameter / 2
    y0, x0 = int(cy - r - 1), int(cx - r - 1)
    n = int(diameter + 3)
    yy, xx = np.mgrid[y0 : y0 + n, x0 : x0 + n]
    dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    shape = dist <= r
    if is_target:
        shape &= dist > r - ring_width
    colour = np.array([95.0, 45.0, 130.0]) + rng.normal(0, 8, 3)  # haematoxylin purple
    region = img[y0 : y0 + n, x0 : x0 + n]
    region[shape] = colour + rng.normal(0, 6, (int(shape.sum()), 3))
    if is_target:
        mask[y0 : y0 + n, x0 : x0 + n][dist <= r] = 1


def make_tiny_objects(
    num: int, settings: TinyObjects | None = None, seed: int = 0, positive_fraction: float = 0.5
) -> list[Example]:
    """Generate ``num`` labelled images in memory (label 1 iff a ring is present).

    Args:
        num: number of images.
        settings: geometry of the set.
        seed: everything is a function of it.
        positive_fraction: share of positive images.

    Returns:
        Examples with an :class:`ArraySource` image and mask.
    """
    s = settings or TinyObjects()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        label = int(rng.random() < positive_fraction)
        img = _background(rng, s.size, s.clutter)
        mask = np.zeros((s.size, s.size), dtype=np.uint8)
        kinds = [False] * int(rng.integers(s.distractors[0], s.distractors[1] + 1))
        if label:
            kinds += [True] * int(rng.integers(s.targets[0], s.targets[1] + 1))
        taken: list[tuple[int, int, int]] = []
        for is_target in kinds:
            d = int(rng.integers(s.object_size[0], s.object_size[1] + 1))
            spot = _place(rng, s.size, d, taken)
            if spot is None:
                continue
            taken.append((*spot, d))
            _draw(img, mask, rng, spot[0], spot[1], d, s.ring_width, is_target)
        if label and mask.sum() == 0:  # no room for a target: draw one anyway
            cy, cx = rng.integers(s.object_size[1], s.size - s.object_size[1], 2)
            _draw(img, mask, rng, cy, cx, s.object_size[1], s.ring_width, True)
        image = np.clip(img, 0, 255).astype(np.uint8)
        out.append(Example(ArraySource(image), label, ArraySource(mask, rgb=False), f"tiny-{seed}-{i}"))
    return out


SHAPES = ("ring", "disc", "cross", "square")


def _draw_shape(img: np.ndarray, mask: np.ndarray, rng, cy: int, cx: int, diameter: int, kind: str) -> None:
    r = diameter / 2
    y0, x0 = int(cy - r - 1), int(cx - r - 1)
    n = int(diameter + 3)
    yy, xx = np.mgrid[y0 : y0 + n, x0 : x0 + n]
    dy, dx = yy - cy, xx - cx
    dist = np.sqrt(dy**2 + dx**2)
    arm = max(2.0, diameter / 6)
    shape = {
        "ring": (dist <= r) & (dist > r - max(2.0, diameter / 5)),
        "disc": dist <= r,
        "cross": ((np.abs(dy) <= arm / 2) | (np.abs(dx) <= arm / 2)) & (np.maximum(np.abs(dy), np.abs(dx)) <= r),
        "square": (np.maximum(np.abs(dy), np.abs(dx)) <= r) & (np.maximum(np.abs(dy), np.abs(dx)) > r - arm),
    }[kind]
    colour = np.array([95.0, 45.0, 130.0]) + rng.normal(0, 8, 3)
    img[y0 : y0 + n, x0 : x0 + n][shape] = colour + rng.normal(0, 6, (int(shape.sum()), 3))
    mask[y0 : y0 + n, x0 : x0 + n][shape] = 1


def make_shapes(
    num: int, classes: int = 3, size: int = 96, object_size: tuple[int, int] = (12, 16), seed: int = 0,
    empty_class: bool = False,
) -> list[Example]:
    """A multi-class tiny-object set: an image of class c holds one small shape of kind c
    (ring, disc, cross, square) on the tissue-like background; no class is "empty". With
    ``empty_class``, class 0 images hold no shape (a reference class, like "no sign") and
    class c > 0 holds shape c - 1.

    >>> ex = make_shapes(4, classes=3, size=64)
    >>> {e.label for e in ex} <= {0, 1, 2}, ex[0].source.height
    (True, 64)
    """
    if not 2 <= classes <= len(SHAPES) + empty_class:
        raise ValueError(f"classes={classes}: choose 2 to {len(SHAPES) + empty_class}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        label = int(rng.integers(0, classes))
        img = _background(rng, size, clutter=2.0)
        mask = np.zeros((size, size), dtype=np.uint8)
        d = int(rng.integers(object_size[0], object_size[1] + 1))
        cy, cx = (int(v) for v in rng.integers(d, size - d, 2))
        if not (empty_class and label == 0):
            _draw_shape(img, mask, rng, cy, cx, d, SHAPES[label - empty_class])
        image = np.clip(img, 0, 255).astype(np.uint8)
        out.append(Example(ArraySource(image), label, ArraySource(mask, rgb=False), f"shapes-{seed}-{i}"))
    return out


def write_images(save, n: int, size: int | None, seed: int) -> list[tuple[str, str, str]]:
    """``n`` images of ``make-data tiny-objects`` (1-3 rings in a positive image) through
    ``save(name, image, mask, label)``; each image is a function of ``seed`` and its index."""
    settings = TinyObjects(size=size or 512, targets=(1, 3))
    rows = []
    for i in range(n):
        ex = make_tiny_objects(1, settings, seed=seed * 100003 + i)[0]
        rows.append(save(f"tiny_{i:05d}", ex.source.image.permute(1, 2, 0).numpy(), ex.mask.image[0].numpy(),
                         "positive" if ex.label else "negative"))
    return rows
