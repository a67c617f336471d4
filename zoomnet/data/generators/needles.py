"""Tiny lesions on real histology: ``needles`` (lesions of 0.1-1 % of the image) and
``needles-hard`` (0.02-0.2 %, fainter, among lone nuclei of the same look, with a stain that
varies from image to image). The background is the IHC image of the ``scikit-image`` wheel,
randomly cropped, flipped and rotated; an image is positive iff it holds a lesion."""

from __future__ import annotations

import numpy as np
from PIL import Image

from zoomnet.data.generators.textures import histology_texture


def _nucleus(img: np.ndarray, ny: float, nx: float, nr: float, colour, strength: float = 1.0) -> None:
    """Paint one round nucleus in place, blended over the background by ``strength``."""
    size_y, size_x = img.shape[:2]
    y0, y1 = int(max(ny - nr - 1, 0)), int(min(ny + nr + 2, size_y))
    x0, x1 = int(max(nx - nr - 1, 0)), int(min(nx + nr + 2, size_x))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    disc = (yy - ny) ** 2 + (xx - nx) ** 2 <= nr * nr
    patch = img[y0:y1, x0:x1]
    patch[disc] = (1.0 - strength) * patch[disc] + strength * np.asarray(colour, dtype=np.float64)


def needles_image(rng, texture: np.ndarray, size: int, positive: bool, hard: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A histology background with 1-3 lesions covering 0.1-1 % of the image if positive.

    ``hard``: the ``needles-hard`` set: 1-2 lesions covering 0.02-0.2 % of the image, their
    nuclei sparser and half-transparent; every image (negatives too) also holds 30-60 lone
    nuclei of the same look, and a per-image stain (channel gains of 0.8-1.2, brightness
    -20..+20), so that a lesion is a cluster, not the presence of dark nuclei, and colour
    says nothing.
    """
    crop = int(rng.integers(256, 513))
    y, x = rng.integers(0, texture.shape[0] - crop + 1), rng.integers(0, texture.shape[1] - crop + 1)
    patch = Image.fromarray(texture[y : y + crop, x : x + crop]).resize((size // 2, size // 2), Image.BILINEAR)
    tile = np.asarray(patch)
    tile = np.rot90(tile, int(rng.integers(0, 4)))
    row = np.concatenate([tile, tile[:, ::-1]], axis=1)
    img = np.concatenate([row, row[::-1]], axis=0)[:size, :size].astype(np.float64)
    if hard:
        img = img * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20)
    img += rng.normal(0, 4, img.shape)
    mask = np.zeros((size, size), dtype=np.uint8)
    colour, strength = (60, 40, 110), (0.6 if hard else 1.0)
    if hard:
        for _ in range(int(rng.integers(30, 61) * (size / 1024) ** 2)):
            _nucleus(img, *rng.uniform(0, size, 2), rng.uniform(1.5, 3.0), colour, strength)
    if positive:
        area = (rng.uniform(0.0002, 0.002) if hard else rng.uniform(0.001, 0.01)) * size * size
        n = int(rng.integers(1, 3 if hard else 4))
        for _ in range(n):
            r = np.sqrt(area / n / np.pi)
            cy, cx = rng.uniform(r + 2, size - r - 2, 2)
            for _ in range(int((2 if hard else 3) * r)):  # dense dark nuclei inside the lesion
                a, d = rng.uniform(0, 2 * np.pi), r * np.sqrt(rng.uniform())
                _nucleus(img, cy + d * np.sin(a), cx + d * np.cos(a), rng.uniform(1.5, 3.0), colour, strength)
            yy, xx = np.mgrid[0:size, 0:size]
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_images(save, n: int, size: int | None, rng: np.random.Generator, hard: bool = False) -> list[tuple[str, str, str]]:
    """Write ``n`` images through ``save(name, image, mask, label)``; return the manifest rows."""
    texture = histology_texture()
    rows = []
    for i in range(n):
        positive = bool(rng.random() < 0.5)
        img, mask = needles_image(rng, texture, size or 1024, positive, hard=hard)
        rows.append(save(f"needles_{i:05d}", img, mask, "positive" if positive else "negative"))
    return rows
