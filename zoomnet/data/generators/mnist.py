"""Megapixel MNIST, as in the ATS paper (Katharopoulos & Fleuret 2019): a 1500 px canvas
with 3 digits of the target class, 2 digits of other classes and 50 line-noise patterns;
10 classes. Training/validation and test images use disjoint digits."""

from __future__ import annotations

import numpy as np

from zoomnet.data.generators.textures import mnist_digits
from zoomnet.errors import UserError


def megapixel_mnist_image(rng, digits, labels, pool, size: int, target: int, noise: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """One canvas: 3 digits of ``target``, 2 of other classes, ``noise`` line patterns."""
    img = np.zeros((size, size), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(noise):  # short random strokes, as bright as the digits
        y, x = rng.integers(0, size - 28, 2)
        angle = rng.uniform(0, np.pi)
        length = rng.integers(8, 24)
        t = np.linspace(0, 1, 4 * length)
        ys = (y + 14 + (t - 0.5) * length * np.sin(angle)).astype(int)
        xs = (x + 14 + (t - 0.5) * length * np.cos(angle)).astype(int)
        img[np.clip(ys, 0, size - 1), np.clip(xs, 0, size - 1)] = 255
    others = [c for c in range(10) if c != target]
    kinds = [target] * 3 + list(rng.choice(others, 2))
    taken: list[tuple[int, int]] = []
    for k in kinds:
        choices = pool[labels[pool] == k]
        d = digits[rng.choice(choices)]
        for _ in range(100):
            y, x = (int(v) for v in rng.integers(0, size - 28, 2))
            if all(abs(y - a) > 28 or abs(x - b) > 28 for a, b in taken):
                break
        taken.append((y, x))
        img[y : y + 28, x : x + 28] = np.maximum(img[y : y + 28, x : x + 28], d)
        if k == target:
            mask[y : y + 28, x : x + 28] |= (d > 64).astype(np.uint8)
    return img, mask


def write_images(save, n: int, size: int | None, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Write ``n`` canvases through ``save(name, image, mask)``; return the manifest rows,
    the last fifth (the test images) drawn from held-out digits."""
    digits, labels = mnist_digits()
    side = size or 1500
    if side < 100:
        raise UserError(f"size {side}: megapixel-mnist needs at least 100 px for 5 digits of 28 px")
    # disjoint digits: the first 80 % of each class for training and validation, the rest for test
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx)) * 10 // len(idx)
    train_pool, test_pool = np.flatnonzero(rank < 8), np.flatnonzero(rank >= 8)
    n_test = n - int(0.8 * n)
    rows = []
    for i in range(n):
        target = int(rng.integers(0, 10))
        img, mask = megapixel_mnist_image(rng, digits, labels, test_pool if i >= n - n_test else train_pool, side, target)
        rows.append(save(f"mnist_{i:05d}", img, mask, str(target)))
    return rows
