"""Colour augmentation: one random brightness, contrast and per-channel gain per image, applied
to everything the model reads of that image (views and sub-tiles alike, so attention and
features see the same colours). Stain and scanner differences between slides are mostly of
this kind."""

from __future__ import annotations

import torch

from zoomnet.core.geometry import Box
from zoomnet.core.source import ImageSource, read_many


class JitteredSource:
    """Wraps a source; every read is colour-jittered with the same draw.

    Args:
        inner: the image.
        strength: maximum relative change of contrast and gains, and of brightness in units
            of the 8-bit range.
        generator: random source of the draw.
    """

    def __init__(self, inner: ImageSource, strength: float, generator: torch.Generator | None = None):
        self.inner = inner
        self.height, self.width, self.channels, self.fill = inner.height, inner.width, inner.channels, inner.fill
        u = torch.rand(2 + inner.channels, generator=generator) * 2 - 1  # in [-1, 1)
        self.brightness = float(u[0]) * strength * 255.0
        self.contrast = 1.0 + float(u[1]) * strength
        self.gain = (1.0 + u[2:] * strength).view(-1, 1, 1)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """The image's draw applied to ``(..., C, h, w)`` raw pixels."""
        return (((x - 127.5) * self.contrast + 127.5 + self.brightness) * self.gain).clamp(0.0, 255.0)

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.jitter(self.inner.read(box, out_size))  # (C, h, w)

    def read_many(self, boxes, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.jitter(read_many(self.inner, boxes, out_size))  # (M, C, h, w)
