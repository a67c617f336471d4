"""In-memory image source (numpy array or tensor)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from zoomnet.core.geometry import Box


def resize(pixels: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Resample ``(C, h, w)`` (or a stack ``(M, C, h, w)``) to ``out_size``: area averaging
    when shrinking (antialiased), bilinear when enlarging."""
    h, w = pixels.shape[-2:]
    if (h, w) == tuple(out_size):
        return pixels
    x = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
    if out_size[0] <= h and out_size[1] <= w:
        x = F.interpolate(x, size=tuple(out_size), mode="area")
    else:
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False, antialias=True)
    return x if pixels.dim() == 4 else x.squeeze(0)


def crop_with_fill(image: torch.Tensor, box: Box, fill: float) -> torch.Tensor:
    """Cut ``box`` out of a ``(C, H, W)`` image (a view in any memory layout) as a
    channel-planar float32 tensor; pixels outside the image hold ``fill``."""
    c, height, width = image.shape
    top, left, h, w = (int(v) for v in box)
    y0, y1 = max(top, 0), min(top + h, height)
    x0, x1 = max(left, 0), min(left + w, width)
    if y0 == top and x0 == left and y1 == top + h and x1 == left + w:
        return image[:, y0:y1, x0:x1].to(torch.float32, memory_format=torch.contiguous_format)
    out = torch.full((c, h, w), float(fill), dtype=torch.float32)
    if y1 > y0 and x1 > x0:
        out[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
    return out


def area_in_bands(read_rows, h: int, w: int, out_size: tuple[int, int], channels: int,
                  band_pixels: int) -> torch.Tensor:
    """Area resampling of an ``h x w`` region to ``out_size`` (the values of :func:`resize`,
    adaptive average pooling) without holding the region in float: ``read_rows(a, b)`` gives
    its rows ``[a, b)`` as ``(C, b - a, w)`` float32, and bands of about ``band_pixels``
    input pixels are read, averaged over columns, then over the rows of each output row
    (``[floor(i h / oh), ceil((i + 1) h / oh))``)."""
    oh, ow = out_size
    out = torch.empty(channels, oh, ow)
    if h % oh == 0 and w % ow == 0:  # whole blocks of pixels: plain average pooling, band by band
        kh, kw = h // oh, w // ow
        per_band = max(1, band_pixels // (w * kh))  # output rows a band serves
        for r0 in range(0, oh, per_band):
            r1 = min(oh, r0 + per_band)
            band = read_rows(r0 * kh, r1 * kh)
            out[:, r0:r1] = band.view(channels, r1 - r0, kh, ow, kw).mean(dim=(2, 4))
        return out
    i = torch.arange(oh + 1, dtype=torch.float64)
    starts, ends = torch.floor(i[:-1] * h / oh).long(), torch.ceil(i[1:] * h / oh).long()
    per_band = max(1, int(band_pixels / w / (h / oh)))  # output rows a band serves
    for r0 in range(0, oh, per_band):
        r1 = min(oh, r0 + per_band)
        a, b = int(starts[r0]), int(ends[r1 - 1])
        band = read_rows(a, b)  # (C, b-a, w)
        cols = F.adaptive_avg_pool2d(band[None], (b - a, ow))[0].double()  # (C, b-a, ow)
        sums = torch.cat([cols.new_zeros(channels, 1, ow), cols.cumsum(1)], dim=1)
        s, e = starts[r0:r1] - a, ends[r0:r1] - a
        out[:, r0:r1] = ((sums[:, e] - sums[:, s]) / (e - s).double()[None, :, None]).float()
    return out


class ArraySource:
    """An image held in memory.

    Args:
        image: ``(H, W)``, ``(H, W, C)`` numpy array or ``(C, H, W)`` tensor of raw values.
            Grayscale is repeated to 3 channels; a 4th (alpha) channel is dropped.
        fill: raw value returned outside the image (0 by default; 255 suits bright-field
            slides, whose black borders would look like false edges).
        rgb: repeat a single channel to 3 and drop an alpha channel (False for masks).

    >>> src = ArraySource(np.zeros((8, 8, 3), dtype=np.uint8), fill=255)
    >>> src.read(Box(-2, -2, 4, 4))[0].tolist()[0]
    [255.0, 255.0, 255.0, 255.0]
    """

    def __init__(self, image: np.ndarray | torch.Tensor, fill: float = 0.0, rgb: bool = True):
        if isinstance(image, np.ndarray):
            arr = image if image.ndim == 3 else image[..., None]
            with warnings.catch_warnings():  # read-only arrays (np.asarray of a PIL image) are never written to here
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (C, H, W) view
        else:
            tensor = image if image.ndim == 3 else image.unsqueeze(0)
        if rgb and tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        elif rgb and tensor.shape[0] == 4:
            tensor = tensor[:3]
        # the caller's pixels as they are (a view: no copy of a large image); each read makes
        # its crop channel-planar, the layout the nets take
        self.image = tensor
        self.channels, self.height, self.width = tensor.shape
        self.fill = float(fill)

    strip_pixels = 250_000  # full-resolution pixels converted to float at a time for a view (3 MB for RGB)

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        box = Box(*(int(v) for v in box))
        if (out_size is not None and box.height * box.width > 4 * self.strip_pixels
                and out_size[0] <= box.height and out_size[1] <= box.width):
            return self._area_in_strips(box, tuple(out_size))
        pixels = crop_with_fill(self.image, box, self.fill)  # (C, h, w)
        return pixels if out_size is None else resize(pixels, tuple(out_size))

    def _area_in_strips(self, box: Box, out_size: tuple[int, int]) -> torch.Tensor:
        """Area resampling of a large box (a level-1 view) without a float copy of it
        (:func:`area_in_bands`): the same values as ``resize``."""
        top, left, h, w = box
        return area_in_bands(lambda a, b: crop_with_fill(self.image, Box(top + a, left, b - a, w), self.fill),
                             h, w, out_size, self.channels, self.strip_pixels)

    def read_many(self, boxes, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(M, C, h, w)`` of boxes of one size, gathered from the stored pixels by one
        indexing operation per group of boxes (rows and columns of every box at once;
        outside the image: the fill value) and resampled group by group. A group holds at
        most ``4 * strip_pixels`` full-resolution pixels, so large tiles cost no more memory
        than reading them one by one."""
        boxes = [Box(*(int(v) for v in box)) for box in boxes]
        sizes = {(b.height, b.width) for b in boxes}
        if len(sizes) != 1:
            return torch.stack([self.read(box, out_size) for box in boxes])
        (h, w), = sizes
        if h * w > 4 * self.strip_pixels:  # one box is already a large read: one at a time, in strips
            return torch.stack([self.read(box, out_size) for box in boxes])
        group = max(1, (4 * self.strip_pixels) // (h * w))
        parts = [self._gather(boxes[i : i + group], h, w, out_size) for i in range(0, len(boxes), group)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gather(self, boxes: list[Box], h: int, w: int, out_size: tuple[int, int] | None) -> torch.Tensor:
        ys = torch.tensor([b.top for b in boxes])[:, None] + torch.arange(h)  # (M, h)
        xs = torch.tensor([b.left for b in boxes])[:, None] + torch.arange(w)  # (M, w)
        outside = any(b.top < 0 or b.left < 0 or b.top + h > self.height or b.left + w > self.width for b in boxes)
        rows, cols = (ys.clamp(0, self.height - 1), xs.clamp(0, self.width - 1)) if outside else (ys, xs)
        pixels = self.image[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1).float()  # (M, C, h, w)
        if outside:
            inside_y, inside_x = (ys >= 0) & (ys < self.height), (xs >= 0) & (xs < self.width)
            inside = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (M, 1, h, w)
            pixels = pixels.masked_fill(~inside, self.fill)
        return pixels if out_size is None else resize(pixels, tuple(out_size))

    def __repr__(self) -> str:
        return f"ArraySource({self.height}x{self.width}x{self.channels})"
