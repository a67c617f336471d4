"""The source interface the model reads pixels through (defined in :mod:`zoomnet.core.source`),
what sources read from files also say (their file's level-0 frame, what they decoded), and
a source that records what is read."""

from __future__ import annotations

import threading
from typing import Sequence

import torch

from zoomnet.core.geometry import Box
from zoomnet.core.source import FileFrame, ImageSource, read_many

__all__ = ["CountingSource", "FileBacked", "FileFrame", "ImageSource", "io_counts", "level0_box", "level0_size",
           "read_many", "read_totals"]

_TOTALS = [0, 0]  # pixels decoded and bytes read by every file source of this process
_TOTALS_LOCK = threading.Lock()  # sources are read from prefetch threads too


def read_totals() -> tuple[int, int]:
    """``(pixels decoded, compressed bytes read)`` by every file source of this process so
    far (whatever files were closed and reopened since): a training epoch's read volume is
    the difference across it."""
    with _TOTALS_LOCK:
        return _TOTALS[0], _TOTALS[1]


class FileBacked:
    """What a source decoded from a file says of itself (:class:`FileFrame`): its frame is
    the file's level 0, and it counts the pixels it decodes and the bytes it reads."""

    height: int
    width: int
    pixels_decoded: int = 0
    bytes_read: int = 0

    def count_read(self, pixels: int, nbytes: int = 0) -> None:
        """Add ``pixels`` decoded and ``nbytes`` read to this source's counts and the process's."""
        self.pixels_decoded += pixels
        self.bytes_read += nbytes
        with _TOTALS_LOCK:
            _TOTALS[0] += pixels
            _TOTALS[1] += nbytes

    def level0_size(self) -> tuple[int, int]:
        return self.height, self.width

    def level0_box(self, box: Box) -> Box:
        return Box(*(int(v) for v in box))

    def io_counts(self) -> tuple[int, int]:
        return self.pixels_decoded, self.bytes_read


def level0_size(source: ImageSource) -> tuple[int, int]:
    """``(height, width)`` of the file a source reads at level 0 (its own size otherwise)."""
    return source.level0_size() if isinstance(source, FileFrame) else (source.height, source.width)


def level0_box(source: ImageSource, box: Box) -> Box:
    """``box`` of the model's frame in level-0 pixels of the file, clipped to the image."""
    native = source.level0_box(box) if isinstance(source, FileFrame) else Box(*box)
    height, width = level0_size(source)
    top, left = max(0, native.top), max(0, native.left)
    bottom, right = min(height, native.top + native.height), min(width, native.left + native.width)
    return Box(top, left, max(0, bottom - top), max(0, right - left))


def io_counts(source: ImageSource) -> tuple[int, int]:
    """``(pixels decoded, bytes read)`` of a source read from a file (a source in memory:
    its pixels, no bytes)."""
    return source.io_counts() if isinstance(source, FileFrame) else (source.height * source.width, 0)


class CountingSource:
    """Wraps a source and records every read: box, output size and decoded pixels.

    Used by tests and benchmarks to show what a forward pass touches.
    """

    def __init__(self, inner: ImageSource):
        self.inner = inner
        self.height, self.width = inner.height, inner.width
        self.channels, self.fill = inner.channels, inner.fill
        self.reads: list[tuple[Box, tuple[int, int] | None]] = []

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        self.reads.append((Box(*box), out_size))
        return self.inner.read(box, out_size)

    def read_many(self, boxes: Sequence[Box], out_size: tuple[int, int] | None = None) -> torch.Tensor:
        self.reads.extend((Box(*box), out_size) for box in boxes)
        return read_many(self.inner, boxes, out_size)

    def full_resolution_reads(self) -> list[Box]:
        """Boxes read without resampling."""
        return [b for b, size in self.reads if size is None or tuple(size) == (b.height, b.width)]
