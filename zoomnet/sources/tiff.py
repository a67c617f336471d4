"""Pyramidal TIFF (pages or SubIFDs: OME-TIFF, Aperio SVS, tiled JPEG/zlib/LZW) read lazily
through tifffile and zarr.

``read(box, out_size)`` picks the coarsest pyramid level that still has at least the
requested resolution, reads only the tiles that hold the box at that level, and resamples
(area averaging) to ``out_size``; pixels outside the image hold ``fill``. Every read is
accounted for: ``pixels_decoded`` counts the pixels of every decoded tile (tifffile decodes
whole tiles) and ``bytes_read`` their compressed bytes in the file.

Modes: grayscale is repeated to 3 channels, a 4th (alpha) channel is dropped, 16-bit
samples are scaled from 0..65535 to 0..255.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from zoomnet.core.geometry import Box
from zoomnet.errors import ImageError
from zoomnet.sources.array import resize


class _Level:
    """One pyramid level: its zarr array, size, tile grid and compressed tile sizes."""

    def __init__(self, array, page, height: int, width: int, downsample: float):
        self.array, self.height, self.width, self.downsample = array, height, width, downsample
        self.tile = (int(page.tilelength or page.rowsperstrip or height), int(page.tilewidth or width))
        self.bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
        self.tiles_across = math.ceil(width / self.tile[1])


def _mpp(tif, page) -> float | None:
    """Microns per pixel at level 0, where the file records it."""
    desc = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", desc)  # Aperio SVS
    if match:
        return float(match.group(1))
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        if match:
            return float(match.group(1))
    tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if tag is not None and unit is not None:
        num, den = tag.value
        per_unit = num / den if den else 0
        scale = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre in microns
        if per_unit > 1 and scale:
            return scale / per_unit
    return None


class TiffSource:
    """A (pyramidal) TIFF read lazily by tiles.

    Decoded tiles stay in a small LRU cache (``cache_tiles``, 64 by default: 12 MB of
    256 px RGB tiles), so the many small reads of one prediction that share a tile decode
    it once.

    Args:
        path: the file.
        fill: raw value returned outside the image.

    Attributes:
        levels: number of pyramid levels.
        mpp: microns per pixel at level 0, or None.
        pixels_decoded: pixels of all tiles decoded so far (cache hits not counted).
        bytes_read: compressed bytes of those tiles.
    """

    cache_tiles = 64

    def __init__(self, path: str | os.PathLike, fill: float = 0.0):
        import tifffile
        import zarr

        self.path, self.fill, self.channels = str(path), float(fill), 3
        self.pixels_decoded = 0
        self.bytes_read = 0
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            axes = series.axes
            if axes not in ("YX", "YXS"):
                raise ImageError(f"{path}: TIFF axes {axes!r} are not supported; save one RGB or gray image (YX or YXS)")
            store = series.aszarr()
            group = zarr.open(store, mode="r")
            arrays = [group[str(i)] for i in range(len(series.levels))] if hasattr(group, "keys") else [group]
            self.height, self.width = series.levels[0].shape[:2]
            self._levels = []
            for lv, arr in zip(series.levels, arrays):
                h, w = lv.shape[:2]
                self._levels.append(_Level(arr, lv.keyframe, h, w, self.height / h))
            self.mpp = _mpp(self._tif, series.levels[0].keyframe)
            self._dtype = series.dtype
        except ImageError:
            raise
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, KeyError ... on damage
            raise ImageError(
                f"{path}: cannot read the image ({type(exc).__name__}: {exc}); the file is corrupt, truncated or "
                "not a TIFF: re-export it"
            ) from None
        self.levels = len(self._levels)
        self.file_size = Path(path).stat().st_size

    def level_for(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for i, lv in enumerate(self._levels):
            if lv.downsample <= downsample * (1 + 1e-6):
                best = i
        return best

    def _tile(self, level: int, r: int, c: int) -> np.ndarray:
        """One decoded tile, from a small LRU cache (neighbouring reads share tiles)."""
        key = (level, r, c)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        lv = self._levels[level]
        th, tw = lv.tile
        try:
            tile = np.asarray(lv.array[r * th : min((r + 1) * th, lv.height), c * tw : min((c + 1) * tw, lv.width)])
        except Exception as exc:  # a damaged tile
            raise ImageError(
                f"{self.path}: cannot read the image, pyramid level {level} ({type(exc).__name__}: {exc}); the file "
                "is corrupt or truncated: re-export it"
            ) from None
        self.pixels_decoded += th * tw  # the codec decodes whole tiles
        index = r * lv.tiles_across + c
        if index < len(lv.bytecounts):
            self.bytes_read += int(lv.bytecounts[index])
        self._cache[key] = tile
        while len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return tile

    def _read_level(self, level: int, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
        """Pixels ``[y0, y1) x [x0, x1)`` of a level as ``(C, h, w)`` float32, fill outside."""
        lv = self._levels[level]
        out = torch.full((3, y1 - y0, x1 - x0), self.fill, dtype=torch.float32)
        ya, yb, xa, xb = max(y0, 0), min(y1, lv.height), max(x0, 0), min(x1, lv.width)
        if yb <= ya or xb <= xa:
            return out
        th, tw = lv.tile
        parts = []
        for r in range(ya // th, (yb - 1) // th + 1):
            row = []
            for c in range(xa // tw, (xb - 1) // tw + 1):
                tile = self._tile(level, r, c)  # (<=th, <=tw, ...)
                ty0, tx0 = r * th, c * tw
                row.append(tile[max(ya - ty0, 0) : min(yb - ty0, th), max(xa - tx0, 0) : min(xb - tx0, tw)])
            parts.append(np.concatenate(row, axis=1))
        block = np.concatenate(parts, axis=0)
        if block.ndim == 2:
            block = block[..., None]
        if block.dtype == np.uint16:
            block = block.astype(np.float32) / 257.0
        pixels = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).permute(2, 0, 1)
        if pixels.shape[0] == 1:
            pixels = pixels.expand(3, -1, -1)
        out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = pixels[:3]
        return out

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        top, left, h, w = (int(v) for v in box)
        if out_size is None or tuple(out_size) == (h, w):
            return self._read_level(0, top, left, top + h, left + w)
        oh, ow = out_size
        level = self.level_for(min(h / oh, w / ow))
        ds = self._levels[level].downsample
        if level == 0:
            return resize(self._read_level(0, top, left, top + h, left + w), (oh, ow))
        # the box in level coordinates, widened to whole level pixels, then resampled and cut
        fy0, fx0, fy1, fx1 = top / ds, left / ds, (top + h) / ds, (left + w) / ds
        y0, x0, y1, x1 = math.floor(fy0), math.floor(fx0), math.ceil(fy1), math.ceil(fx1)
        region = self._read_level(level, y0, x0, y1, x1)  # (C, y1-y0, x1-x0)
        sy, sx = oh / (fy1 - fy0), ow / (fx1 - fx0)  # output pixels per level pixel
        big = (max(oh, round((y1 - y0) * sy)), max(ow, round((x1 - x0) * sx)))
        scaled = resize(region, big)
        oy, ox = round((fy0 - y0) * sy), round((fx0 - x0) * sx)
        oy, ox = min(oy, big[0] - oh), min(ox, big[1] - ow)
        return scaled[:, oy : oy + oh, ox : ox + ow].contiguous()

    def close(self) -> None:
        self._tif.close()

    def __repr__(self) -> str:
        return f"TiffSource({self.path!r}, {self.height}x{self.width}, {self.levels} levels)"
