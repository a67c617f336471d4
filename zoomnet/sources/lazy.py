"""An image source that opens its file on first read: a manifest of thousands of images, or
a cohort of slides, holds only the few open files of a small per-process cache (a
DataLoader worker's, or prediction's threads')."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from zoomnet.core.geometry import Box
from zoomnet.core.source import FileFrame, ImageSource, read_many
from zoomnet.sources.base import io_counts, level0_size
from zoomnet.errors import ImageError
from zoomnet.sources.open import PLAIN, image_size, open_image
from zoomnet.sources.rescaled import RescaledSource

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
            raise ImageError(self._named(str(exc))) from None
        self.channels = 3
        self.pixels_read = 0
        # what the open file (shared with other images of the path) had decoded before this
        # image: nothing where it is not open yet (a plain image decodes whole as it opens)
        with _LOCK:
            open_now = _OPEN.get(self._key())
        self._counted_from = io_counts(open_now) if open_now is not None else (0, 0)

    def _named(self, message: str) -> str:
        """An error message with the file named as the manifest wrote it, and where that
        led when it is not the same (a relative path is taken from the CSV's folder)."""
        resolved = str(self.path)
        name = self.given if self.given in (resolved, "") or Path(self.given) == self.path else (
            f"{self.given} (resolved to {resolved})")
        return message.replace(resolved, name, 1)

    def opened(self) -> ImageSource:
        """The open source (opened now if it is not in the per-process cache)."""
        key = self._key()
        with _LOCK:
            if key in _OPEN:
                _OPEN.move_to_end(key)
                return _OPEN[key]
        try:
            src = open_image(self.path, fill=self.fill, max_pixels=self.max_pixels)
            if self.target_mpp:
                src = RescaledSource(src, self.target_mpp, self.given)
        except ImageError as exc:
            raise ImageError(self._named(str(exc))) from None
        with _LOCK:
            _OPEN[key] = src
            while len(_OPEN) > CACHE_SIZE:
                _OPEN.popitem(last=False)
        return src

    def _key(self) -> tuple:
        return (str(self.path), self.fill, self.target_mpp, self.max_pixels)

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        out = self.opened().read(box, out_size)
        self.pixels_read += int(out.shape[-1] * out.shape[-2])
        return out

    def read_many(self, boxes, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        out = read_many(self.opened(), boxes, out_size)  # (M, C, h, w)
        self.pixels_read += int(out.shape[0] * out.shape[-1] * out.shape[-2])
        return out

    def level0_size(self) -> tuple[int, int]:
        return level0_size(self.opened())

    def level0_box(self, box: Box) -> Box:
        src = self.opened()
        return src.level0_box(box) if isinstance(src, FileFrame) else Box(*box)

    def io_counts(self) -> tuple[int, int]:
        """Pixels decoded and bytes read since this image first read its file (not what
        earlier images of the same path, in this process, had the open file decode)."""
        now = io_counts(self.opened())
        return now[0] - self._counted_from[0], now[1] - self._counted_from[1]
