"""The interface the model reads pixels through: an image source knows its size and reads a
box of it, optionally resampled. Implementations (in memory, Pillow, TIFF, OpenSlide) live
in :mod:`zoomnet.sources`; the model and the losses depend only on this protocol."""

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
    if len(boxes) == 1:
        return source.read(boxes[0], out_size)[None]
    return torch.stack([source.read(box, out_size) for box in boxes])


@runtime_checkable
class FileFrame(Protocol):
    """What a source read from a file also says (optional; ``zoomnet.sources.base`` has the
    helpers that fall back to the source's own frame): where its boxes lie in the file's
    level-0 pixels (the frame slide viewers show; a source seen at another resolution maps
    its boxes there), and what it has decoded."""

    def level0_size(self) -> tuple[int, int]:
        """``(height, width)`` of the file's level 0."""
        ...

    def level0_box(self, box: Box) -> Box:
        """``box`` of this source's frame in the file's level-0 pixels (not clipped)."""
        ...

    def io_counts(self) -> tuple[int, int]:
        """``(pixels decoded, compressed bytes read)`` so far."""
        ...
