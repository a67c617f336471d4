"""Manifests: a CSV with columns ``path,label`` (and optionally ``mask``), one image a row.

Paths are absolute or relative to the CSV's folder. Labels are class names or integers; the
class list is the sorted set of training labels (numerically sorted when all are integers)
unless the config gives one, and it is saved with the run. Images open lazily, on first
read, and stay open in a small per-process cache, so a DataLoader worker or a long cohort
never holds more than a few decoded images.
"""

from __future__ import annotations

import csv
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from zoomnet.core.geometry import Box
from zoomnet.data.examples import Example
from zoomnet.errors import ImageError, UserError
from zoomnet.core.source import ImageSource, read_many
from zoomnet.sources.open import PLAIN, image_size, open_image
from zoomnet.sources.rescaled import RescaledSource


@dataclass
class Row:
    """One manifest row: the image path as written, resolved, its label and mask."""

    given: str
    path: Path
    label: str
    mask: Path | None


def read_manifest(csv_path: str | Path, labels: bool = True) -> list[Row]:
    """Read and check a manifest CSV.

    Args:
        labels: the ``label`` column is required (False: optional, for prediction; rows
            without one get the label ``""``).

    Raises:
        UserError: missing file, missing columns, no rows, an empty path or label.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: no such CSV file; give a CSV with columns path,label")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            raw = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: not a readable CSV ({exc}); save it as UTF-8 text with columns path,label") from None
    missing = [c for c in (("path", "label") if labels else ("path",)) if c not in columns]
    if missing:
        found = ", ".join(columns) if columns else "none"
        raise UserError(
            f"{csv_path}: missing column {' and '.join(repr(m) for m in missing)} (found: {found}); "
            "the first line must name the columns path,label[,mask]"
        )
    rows = []
    for n, rec in enumerate(raw, start=2):
        rec = {k.strip(): (v or "").strip() for k, v in rec.items() if k is not None}
        if not rec.get("path"):
            raise UserError(f"{csv_path}: line {n} has an empty path; give every row an image path")
        if labels and rec.get("label", "") == "":
            raise UserError(f"{csv_path}: line {n} ({rec['path']}) has an empty label; give every row a label")
        given = rec["path"]
        path = Path(given) if Path(given).is_absolute() else csv_path.parent / given
        mask = rec.get("mask") or None
        mask_path = None if mask is None else (Path(mask) if Path(mask).is_absolute() else csv_path.parent / mask)
        rows.append(Row(given, path, rec.get("label", ""), mask_path))
    if not rows:
        raise UserError(f"{csv_path}: the CSV has no rows; add one line path,label per image")
    return rows


def class_list(rows: list[Row]) -> list[str]:
    """Sorted class names (numeric order when every label is an integer)."""
    labels = sorted({r.label for r in rows})
    if all(lab.lstrip("-").isdigit() for lab in labels):
        labels = sorted(labels, key=int)
    return labels


EMPTY_NAMES = ("negative", "normal", "background", "empty", "no-sign", "no-object")


def default_reference(classes: list[str]) -> str | None:
    """The negative class: one named ``negative``, ``normal``, ``background``, ``empty``,
    ``no-sign`` or ``no-object`` (any case, ``-`` or ``_``), or, with two classes only,
    ``0``."""
    names = EMPTY_NAMES + (("0",) if len(classes) == 2 else ())
    for name in names:
        for c in classes:
            if c.lower().replace("_", "-") == name:
                return c
    return None


def resolve_reference(classes: list[str], given: str | None) -> str | None:
    """The reference (negative) class of a run, or None for the multi-class terms.

    ``given`` (``data.reference_class``) wins; ``"none"`` asks for no reference class. Left
    unset, a class whose name says its images hold nothing (``negative``, ``normal``,
    ``background``, ``no-sign`` ...; see ``default_reference``), or ``0`` in a binary set;
    otherwise none (the digit "0" of Megapixel MNIST is a class, not "nothing").

    >>> resolve_reference(["negative", "positive"], None)
    'negative'
    >>> resolve_reference(["50", "70", "80", "no-sign"], None)
    'no-sign'
    >>> resolve_reference(["cat", "No_Object"], None)
    'No_Object'
    >>> resolve_reference([str(d) for d in range(10)], None) is None
    True

    Raises:
        UserError: ``given`` names no class.
    """
    if given is None:
        return default_reference(classes)
    if given.lower() == "none":
        return None
    if given not in classes:
        raise UserError(f"data.reference_class={given!r} is not a class ({', '.join(classes)}); fix the name, or 'none'")
    return given


_OPEN: OrderedDict[tuple, ImageSource] = OrderedDict()
_LOCK = threading.Lock()  # prediction opens the next files in threads
CACHE_SIZE = 16


class LazyImage:
    """An image source that opens its file on first read and keeps it in a per-process LRU.

    Its size is read from the file's header without decoding the pixels.
    """

    def __init__(self, path: Path, given: str, fill: float = 0.0, target_mpp: float | None = None,
                 max_pixels: int = 256_000_000):
        self.path, self.given, self.fill, self.target_mpp = Path(path), given, float(fill), target_mpp
        self.max_pixels = max_pixels
        try:
            # plain images: the size from the header, pixels decoded on first read; lazy
            # formats (TIFF, slides) open cheaply, so open them once and keep them cached
            if target_mpp or self.path.suffix.lower() not in PLAIN:
                src = self.opened()
                self.height, self.width = src.height, src.width
            else:
                self.height, self.width = image_size(self.path)
        except ImageError as exc:
            raise ImageError(str(exc).replace(str(self.path), given, 1)) from None
        self.channels = 3
        self.pixels_read = 0

    def opened(self) -> ImageSource:
        """The open source (opened now if it is not in the per-process cache)."""
        key = (str(self.path), self.fill, self.target_mpp, self.max_pixels)
        with _LOCK:
            if key in _OPEN:
                _OPEN.move_to_end(key)
                return _OPEN[key]
        try:
            src = open_image(self.path, fill=self.fill, max_pixels=self.max_pixels)
            if self.target_mpp:
                src = RescaledSource(src, self.target_mpp, self.given)
        except ImageError as exc:
            raise ImageError(str(exc).replace(str(self.path), self.given, 1)) from None
        with _LOCK:
            _OPEN[key] = src
            while len(_OPEN) > CACHE_SIZE:
                _OPEN.popitem(last=False)
        return src

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        out = self.opened().read(box, out_size)
        self.pixels_read += int(out.shape[-1] * out.shape[-2])
        return out

    def read_many(self, boxes, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        out = read_many(self.opened(), boxes, out_size)  # (M, C, h, w)
        self.pixels_read += int(out.shape[0] * out.shape[-1] * out.shape[-2])
        return out


def load_examples(
    csv_path: str | Path, classes: list[str], fill: float = 0.0, role: str = "training",
    target_mpp: float | None = None, max_pixels: int = 256_000_000,
) -> list[Example]:
    """Examples of a manifest, labels mapped to ``classes``.

    Raises:
        UserError: a label not in ``classes``, a missing or unreadable image.
    """
    rows = read_manifest(csv_path)
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for r in rows:
        if r.label not in index:
            raise UserError(
                f"{csv_path}: label {r.label!r} of {r.given} is not in the class list "
                f"({', '.join(classes)}) of the {role} run; fix the label or retrain with it"
            )
        image = LazyImage(r.path, r.given, fill, target_mpp, max_pixels)
        mask = None if r.mask is None else _MaskView(LazyImage(r.mask, str(r.mask), max_pixels=max_pixels), image)
        out.append(Example(image, index[r.label], mask, r.given))
    return out


class _MaskView:
    """A mask file read as one channel with values in {0, 1} (any non-zero pixel is object),
    in the frame of its image: the mask may be stored at another size (a slide's mask at
    1/16 of level 0, say) and the image may be seen at ``data.target_mpp``; a box of the
    model's frame maps to the mask by the ratio of their sizes. The mask opens through the
    same lazy sources as images, so a pyramidal mask of a slide reads only the tiles a box
    touches.
    """

    def __init__(self, src: LazyImage, image):
        self.src = src
        self.height, self.width, self.channels, self.fill = image.height, image.width, 1, 0.0
        self.ry, self.rx = src.height / image.height, src.width / image.width

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        top, left, h, w = (int(v) for v in box)
        if (self.ry, self.rx) == (1.0, 1.0):
            native = Box(top, left, h, w)
        else:
            y0, x0 = math.floor(top * self.ry), math.floor(left * self.rx)
            y1, x1 = math.ceil((top + h) * self.ry), math.ceil((left + w) * self.rx)
            native = Box(y0, x0, max(1, y1 - y0), max(1, x1 - x0))
        binary = (self.src.read(native)[:1] > 0).float()  # (1, h', w')
        size = out_size or (h, w)
        if tuple(binary.shape[-2:]) == tuple(size):
            return binary
        from zoomnet.sources.array import resize

        return resize(binary, size)
