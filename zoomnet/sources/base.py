"""The source interface the model reads pixels through."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from zoomnet.core.geometry import Box


@runtime_checkable
class ImageSource(Protocol):
    """A lazily read image.

    Attributes:
        height: full-resolution height in pixels.
        width: full-resolution width in pixels.
        channels: channels returned by :meth:`read`.
        fill: raw pixel value returned outside the image.
    """

    height: int
    width: int
    channels: int
    fill: float

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Read ``box`` (full-resolution pixels, may extend past the image).

        Args:
            box: the region to read.
            out_size: ``(h, w)`` to resample to (area / antialiased); None for full
                resolution.

        Returns:
            ``(C, h, w)`` float32 tensor of raw pixel values (0..255 for 8-bit images);
            pixels outside the image hold ``fill``.
        """
        ...


def read_many(source: ImageSource, boxes: Sequence[Box], out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read several boxes of one source as ``(M, C, h, w)``: the source's own ``read_many``
    where it has one (one crop-and-resample pass for a whole level), else one
    :meth:`ImageSource.read` per box. Boxes must give one output size (one ``out_size``, or
    boxes of one size)."""
    many = getattr(source, "read_many", None)
    if many is not None:
        return many(boxes, out_size)
    return torch.stack([source.read(box, out_size) for box in boxes])


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
