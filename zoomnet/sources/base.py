"""The source interface the model reads pixels through (defined in :mod:`zoomnet.core.source`)
and a source that records what is read."""

from __future__ import annotations

from typing import Sequence

import torch

from zoomnet.core.geometry import Box
from zoomnet.core.source import ImageSource, read_many

__all__ = ["CountingSource", "ImageSource", "read_many"]


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
