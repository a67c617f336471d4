"""Sources that measure methods rather than read files (the benchmark's): an in-memory image
kept as numpy with the pyramid levels a tiled file would hold (:class:`NumpySource`), and
ATS as published, the whole image held as one float tensor (:class:`HeldSource`)."""

from __future__ import annotations

import numpy as np
import torch

from zoomnet.core.geometry import Box


class NumpySource:
    """A lazy in-memory source: the image stays a numpy array, with the pyramid levels a
    tiled file would hold (``scales``, built once, as a file's levels exist before it is
    read). A view at one of those scales is a crop of its level; any other read is cropped
    and area-resampled in uint8. Only what a method reads becomes a tensor and counts."""

    def __init__(self, image: np.ndarray, fill: float = 0.0, scales: tuple[float, ...] = ()):
        from PIL import Image

        self.image = image
        self.height, self.width = image.shape[:2]
        self.channels, self.fill = 3, float(fill)
        self.levels = {}
        for s in scales:
            size = (round(self.width * s), round(self.height * s))
            self.levels[s] = np.asarray(Image.fromarray(image).resize(size, Image.BOX))

    def _crop(self, array: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
        height, width = array.shape[:2]
        ya, yb, xa, xb = max(top, 0), min(top + h, height), max(left, 0), min(left + w, width)
        if ya == top and xa == left and yb - ya == h and xb - xa == w:
            return array[ya:yb, xa:xb]
        crop = np.full((h, w, 3), self.fill, dtype=np.uint8)
        if yb > ya and xb > xa:
            crop[ya - top : yb - top, xa - left : xb - left] = array[ya:yb, xa:xb]
        return crop

    def read(self, box: Box, out_size=None) -> torch.Tensor:
        from PIL import Image

        top, left, h, w = (int(v) for v in box)
        if out_size is not None and tuple(out_size) != (h, w):
            oh, ow = (int(v) for v in out_size)
            for s, level in self.levels.items():
                scaled = (top * s, left * s, h * s, w * s)
                if all(abs(v - round(v)) < 1e-6 for v in scaled) and (round(h * s), round(w * s)) == (oh, ow):
                    crop = self._crop(level, *(round(v) for v in scaled))
                    break
            else:
                crop = np.asarray(Image.fromarray(np.ascontiguousarray(self._crop(self.image, top, left, h, w)))
                                  .resize((ow, oh), Image.BOX))
        else:
            crop = self._crop(self.image, top, left, h, w)
        # one numpy pass to channels-first float32: one tensor operation, not four
        return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32))  # (C, h, w)


class HeldSource:
    """ATS as published: the whole full-resolution image held as one tensor."""

    def __init__(self, image: np.ndarray):
        image = image if image.flags.writeable else image.copy()
        self.tensor = torch.from_numpy(image).permute(2, 0, 1).float()  # (C, H, W): the float copy counts
        self.channels, self.height, self.width = self.tensor.shape
        self.fill = 0.0

    def read(self, box: Box, out_size=None) -> torch.Tensor:
        from zoomnet.sources.array import crop_with_fill, resize

        pixels = crop_with_fill(self.tensor, Box(*box), self.fill)
        return pixels if out_size is None else resize(pixels, tuple(out_size))
