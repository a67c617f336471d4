"""Vendor whole-slide formats (Hamamatsu NDPI, MIRAX, Leica SCN, Ventana BIF, ...) through
OpenSlide, an optional extra: ``pip install 'zoomnet[slides]'`` (openslide-python and
openslide-bin, the library as a wheel).

OpenSlide is native code: a damaged file can crash the process rather than raise. Each file
is therefore first opened and read once in a child process; only if that succeeds is it
opened here, so a bad slide costs one clear error, not the run. TIFF-family files do not
come here: OpenSlide ignores SubIFD pyramids and would decode level 0 for a thumbnail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from zoomnet.core.geometry import Box
from zoomnet.errors import ImageError
from zoomnet.sources.array import resize
from zoomnet.sources.base import FileBacked

VENDOR = {".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"}

_PROBE = """
import sys, openslide
s = openslide.OpenSlide(sys.argv[1])
lv = s.level_count - 1
w, h = s.level_dimensions[lv]
s.read_region((0, 0), lv, (min(w, 64), min(h, 64)))
s.read_region((0, 0), 0, (32, 32))
"""


def _install_hint() -> str:
    return "install the slide extra: pip install 'zoomnet[slides]'"


class OpenSlideSource(FileBacked):
    """A slide read through OpenSlide at the pyramid level that fits each request.

    Args:
        path: the slide.
        fill: raw value for pixels outside the slide (OpenSlide's transparent pixels).
        probe_timeout: seconds the child-process check may take.
        max_pixels: the most pixels one read may take from its pyramid level
            (``data.max_pixels``), checked before OpenSlide decodes anything: a slide
            without coarse levels would otherwise decode level 0 for a level-1 view.
    """

    def __init__(self, path: str | os.PathLike, fill: float = 0.0, probe_timeout: float = 120.0,
                 max_pixels: int = 256_000_000):
        self.path, self.fill, self.channels = str(path), float(fill), 3
        self.max_pixels = int(max_pixels)
        try:
            import openslide
        except ImportError:
            raise ImageError(f"{path}: a vendor slide format needs OpenSlide; {_install_hint()}") from None
        try:
            probe = subprocess.run([sys.executable, "-c", _PROBE, self.path], capture_output=True, text=True,
                                   timeout=probe_timeout)
        except subprocess.TimeoutExpired:
            raise ImageError(f"{path}: OpenSlide did not open the slide within {probe_timeout:.0f} s; check the file") from None
        if probe.returncode != 0:
            why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
            if probe.returncode < 0:
                why = f"the reader crashed (signal {-probe.returncode})"
            raise ImageError(f"{path}: cannot read the image with OpenSlide ({why}); the file is corrupt or unsupported")
        self._slide = openslide.OpenSlide(self.path)
        self.width, self.height = self._slide.dimensions
        self.levels = self._slide.level_count
        mpp = self._slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        self.pixels_decoded = 0
        self.bytes_read = 0  # OpenSlide does not say; the pixels it returned are counted above
        self.file_size = Path(path).stat().st_size

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        top, left, h, w = (int(v) for v in box)
        want = 1.0 if out_size is None else min(h / out_size[0], w / out_size[1])
        level = self._slide.get_best_level_for_downsample(max(want, 1.0))
        ds = self._slide.level_downsamples[level]
        lh, lw = max(1, round(h / ds)), max(1, round(w / ds))
        if lh * lw > self.max_pixels:
            raise ImageError(
                f"{self.path}: one read would decode {lw}x{lh} pixels of pyramid level {level} (downsample {ds:g}; "
                f"data.max_pixels is {self.max_pixels:,}); the slide lacks a coarse enough level: save it with a "
                "pyramid (e.g. `vips tiffsave IN OUT.tif --tile --pyramid`) or raise data.max_pixels"
            )
        region = np.asarray(self._slide.read_region((left, top), level, (lw, lh)), dtype=np.float32)  # RGBA
        self.count_read(lh * lw)
        alpha = region[..., 3:4] / 255.0  # transparent outside the slide: the fill value
        rgb = region[..., :3] * alpha + self.fill * (1 - alpha)
        pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        target = (h, w) if out_size is None else tuple(out_size)
        return pixels if pixels.shape[-2:] == target else resize(pixels, target)

    def close(self) -> None:
        self._slide.close()
