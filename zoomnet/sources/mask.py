"""Object masks in the frame of their image."""

from __future__ import annotations

import math

import torch

from zoomnet.core.geometry import Box
from zoomnet.sources.array import resize
from zoomnet.errors import ImageError
from zoomnet.sources.lazy import LazyImage

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
        return resize(binary, size)
