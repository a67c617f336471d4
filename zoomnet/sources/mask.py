"""Object masks in the frame of their image."""

from __future__ import annotations

import math

import torch

from zoomnet.core.geometry import Box
from zoomnet.sources.array import area_in_bands, resize
from zoomnet.errors import ImageError
from zoomnet.sources.lazy import LazyImage

BAND_PIXELS = 1 << 22  # mask pixels per band where a large stretch of mask is shrunk or searched


class MaskSource:
    """A mask file read as one channel with values in {0, 1} (any non-zero pixel is object),
    in the frame of its image: the mask may be stored at another size (a slide's mask at
    1/16 of level 0, say) and the image may be seen at ``data.target_mpp``; a box of the
    model's frame maps to the mask by the ratio of their sizes. The mask opens through the
    same lazy sources as images, so a pyramidal mask of a slide reads only the tiles a box
    touches.
    """

    def __init__(self, src: LazyImage, image, name: str = ""):
        self.src = src
        self.height, self.width, self.channels, self.fill = image.height, image.width, 1, 0.0
        self.ry, self.rx = src.height / image.height, src.width / image.width
        # a mask at another scale keeps the image's shape, to a pixel of rounding either way
        if abs(src.height - image.height * self.rx) > 1.5 and abs(src.width - image.width * self.ry) > 1.5:
            raise ImageError(
                f"{name or src.given}: the mask is {src.width}x{src.height} and its image {image.width}x{image.height}: "
                "not the same shape at any scale; give the image's mask (at full size or scaled down evenly)"
            )

    def _binary_rows(self, native: Box):
        """``rows(a, b)``: rows ``[a, b)`` of ``native`` (a box of the stored mask), 1 on objects."""
        return lambda a, b: (self.src.read(Box(native.top + a, native.left, b - a, native.width))[:1] > 0).float()

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        top, left, h, w = (int(v) for v in box)
        if (self.ry, self.rx) == (1.0, 1.0):
            native = Box(top, left, h, w)
        else:
            y0, x0 = math.floor(top * self.ry), math.floor(left * self.rx)
            y1, x1 = math.ceil((top + h) * self.ry), math.ceil((left + w) * self.rx)
            native = Box(y0, x0, max(1, y1 - y0), max(1, x1 - x0))
        size = tuple(out_size or (h, w))
        rows = self._binary_rows(native)
        if size[0] <= native.height and size[1] <= native.width and native.height * native.width > 4 * BAND_PIXELS:
            # a large stretch of mask shrunk (a slide's whole mask to its level-1 cells): band by band
            return area_in_bands(rows, native.height, native.width, size, 1, BAND_PIXELS)
        binary = rows(0, native.height)  # (1, h', w')
        if tuple(binary.shape[-2:]) == size:
            return binary
        return resize(binary, size)

    def any_object(self) -> bool:
        """Whether any pixel of the stored mask marks an object, read band by band at its
        own size (a slide's mask is never held whole, nor blown up to the slide's size)."""
        rows = self._binary_rows(Box(0, 0, self.src.height, self.src.width))
        step = max(1, BAND_PIXELS // self.src.width)
        return any(bool(rows(a, min(a + step, self.src.height)).any()) for a in range(0, self.src.height, step))
