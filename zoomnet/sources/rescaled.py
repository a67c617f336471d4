"""A source seen at another physical resolution.

A model trained at 0.5 um/px reads regions of fixed pixel size; on a slide scanned at
0.25 um/px the same tissue spans twice as many pixels. ``RescaledSource`` presents the
slide as if scanned at the target resolution: its size is the native size times
``native_mpp / target_mpp``, and a read of a box maps to the corresponding native box,
resampled to the box's size (or the requested output size), so the pyramid level that
fits is used.
"""

from __future__ import annotations

import math

import torch

from zoomnet.core.geometry import Box
from zoomnet.errors import ImageError
from zoomnet.sources.base import FileFrame, ImageSource, io_counts, level0_size


def plausible_mpp(mpp: float) -> bool:
    """Whether microns per pixel can be a slide's (0.05-100 um: any microscope objective) or
    a remote-sensing scene's (1 cm to 1 km per pixel); 72 dpi (353 um) is neither.

    >>> plausible_mpp(0.25), plausible_mpp(3e5), plausible_mpp(25400 / 72)
    (True, True, False)
    """
    return 0.05 <= mpp <= 100 or 1e4 <= mpp <= 1e9


class RescaledSource:
    """``inner`` at ``target_mpp`` microns per pixel (its own ``mpp`` must be known).

    >>> import numpy as np
    >>> from zoomnet.sources import ArraySource
    >>> native = ArraySource(np.zeros((400, 600, 3), np.uint8)); native.mpp = 0.25
    >>> src = RescaledSource(native, 0.5)
    >>> (src.height, src.width), tuple(src.read(Box(0, 0, 10, 10)).shape)
    ((200, 300), (3, 10, 10))
    """

    def __init__(self, inner: ImageSource, target_mpp: float, name: str = ""):
        mpp = getattr(inner, "mpp", None)
        if not mpp:
            raise ImageError(
                f"{name or inner}: the file records no microns per pixel; drop data.target_mpp or "
                "convert the slide with its resolution"
            )
        if not plausible_mpp(mpp):
            raise ImageError(
                f"{name or inner}: records {mpp:g} um per pixel, which is no slide's or scene's pixel size "
                "(a screen resolution such as 72 dpi, or a wrong unit); drop data.target_mpp for it or fix the "
                "file's resolution tags"
            )
        if target_mpp / mpp < 1 / 8:
            raise ImageError(
                f"{name or inner}: scanned at {mpp:g} um per pixel, {mpp / target_mpp:.0f}x coarser than "
                f"data.target_mpp={target_mpp:g}; it would be enlarged beyond what it holds: use slides scanned "
                "at the model's resolution or a model trained at a coarser one"
            )
        self.inner, self.factor = inner, target_mpp / mpp  # native pixels per target pixel
        self.mpp = target_mpp
        self.height = max(1, math.floor(inner.height / self.factor))
        self.width = max(1, math.floor(inner.width / self.factor))
        self.channels, self.fill = inner.channels, inner.fill

    def native_box(self, box: Box) -> Box:
        """The box of the wrapped (level-0, native) image that a read of ``box`` reads."""
        top, left, h, w = (int(v) for v in box)
        f = self.factor
        return Box(round(top * f), round(left * f), max(1, round(h * f)), max(1, round(w * f)))

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.inner.read(self.native_box(box), out_size or (int(box[2]), int(box[3])))

    def level0_size(self) -> tuple[int, int]:
        return level0_size(self.inner)

    def level0_box(self, box: Box) -> Box:
        native = self.native_box(box)
        return self.inner.level0_box(native) if isinstance(self.inner, FileFrame) else native

    def io_counts(self) -> tuple[int, int]:
        return io_counts(self.inner)
