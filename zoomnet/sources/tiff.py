"""Pyramidal TIFF (pages or SubIFDs: OME-TIFF, Aperio SVS, tiled JPEG/zlib/LZW) read lazily
through tifffile and zarr.

``read(box, out_size)`` picks the coarsest pyramid level that still has at least the
requested resolution, reads only the tiles that hold the box at that level, and resamples
(area averaging) to ``out_size``; pixels outside the image hold ``fill``. Every read is
accounted for: ``pixels_decoded`` counts the pixels of every decoded tile (tifffile decodes
whole tiles) and ``bytes_read`` their compressed bytes in the file.

Samples become RGB in 0..255 where their meaning is defined, and are refused in one line
where it is not (:func:`sample_rule`): 8-bit as they are, 16-bit scaled from 0..65535,
1-bit to 0/255, floating point by its range (0..1 scaled, 0..255 as it is, decided once
from the coarsest level), palette images through their colour map, CMYK converted,
min-is-white inverted, gray repeated to 3 channels, one alpha (extra) sample after gray or
RGB dropped, planar (separate-plane) RGB read plane by plane. Signed and 32-bit
integers, and more than one sample per pixel that is not RGB or CMYK (multispectral), have
no display range: they are refused.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from zoomnet.core.geometry import Box
from zoomnet.errors import ImageError
from zoomnet.sources.array import area_in_bands, resize
from zoomnet.sources.base import FileBacked


# tifffile reports damage it works around through logging; without a handler Python would
# print each report to stderr, around our one-line error. What matters reaches the user as
# an ImageError; an application that configures logging still receives the reports.
logging.getLogger("tifffile").addHandler(logging.NullHandler())

MAX_TILES_PER_READ = 65_536  # tiles of 16 px on an 8192^2 level: 262,144 decoder calls for one view


class _Level:
    """One pyramid level: its zarr array, size, tile grid and compressed tile sizes."""

    def __init__(self, array, page, height: int, width: int, downsample: float):
        self.array, self.height, self.width, self.downsample = array, height, width, downsample
        self.tile = (int(page.tilelength or page.rowsperstrip or height), int(page.tilewidth or width))
        self.bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
        self.tiles_across = math.ceil(width / self.tile[1])


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _decoder_pool(workers: int) -> ThreadPoolExecutor:
    """One pool of tile decoders per size, shared by every TIFF source of the process."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="zoomnet-tiles")
        return _POOLS[workers]


_HINT = "; save it as 8-bit or 16-bit RGB or grayscale"


def _sample_scale(series, dtype: np.dtype, name: str) -> float:
    """The factor taking the samples to 0..255: 16-bit from 0..65535, 1-bit to 0/255,
    floating point by its range (0..1 scaled, 0..255 as it is, decided once from the
    coarsest level); types without a display range are refused."""
    hint = _HINT
    if dtype.kind in "iu" and (dtype.kind == "i" or dtype.itemsize > 2):
        raise ImageError(f"{name}: {dtype} samples have no display range{hint}")
    if dtype == np.uint16:
        return 1 / 257.0
    if dtype == np.bool_:
        return 255.0
    if dtype.kind == "f":
        coarsest = series.levels[-1]
        if int(np.prod(coarsest.shape)) > 64_000_000:
            raise ImageError(f"{name}: floating-point samples in a {coarsest.shape} image without a pyramid: their "
                             f"range cannot be checked cheaply{hint}")
        values = coarsest.asarray()
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
            raise ImageError(f"{name}: floating-point samples from {low:g} to {high:g} are neither 0..1 nor 0..255{hint}")
        return 255.0 if high <= 1.0 else 1.0
    if dtype != np.uint8:
        raise ImageError(f"{name}: {dtype} samples are not supported{hint}")
    return 1.0


def sample_rule(tif, series, planar: bool, name: str):
    """A function from a raw block ``(h, w[, S])`` to ``(h, w, 3)`` float32 in 0..255, or an
    :class:`ImageError` naming the file and what to convert it to."""
    page = series.levels[0].keyframe
    dtype = np.dtype(series.dtype)
    photometric = int(page.photometric)
    if photometric == 6 and int(page.compression) in (6, 7, 33007):  # YCbCr JPEG tiles decode to RGB
        photometric = 2
    samples = int(page.samplesperpixel)
    scale = _sample_scale(series, dtype, name)
    hint = _HINT
    if photometric == 3:  # palette: indices into a 16-bit colour map
        colormap = page.colormap
        if samples != 1 or colormap is None or np.asarray(colormap).ndim != 2 or np.asarray(colormap).shape[0] != 3:
            raise ImageError(f"{name}: a palette image needs one sample per pixel and a colour map "
                             f"({samples} samples, {'no' if colormap is None else 'a malformed'} colour map){hint}")
        cmap = np.asarray(colormap, dtype=np.float32).T / 257.0  # (entries, 3)
        return lambda block: cmap[np.clip(block.reshape(block.shape[:2]).astype(np.int64), 0, len(cmap) - 1)]
    if photometric == 5:  # separated: CMYK
        if samples != 4 or dtype != np.uint8:
            raise ImageError(f"{name}: {samples} ink samples of {dtype} (only 8-bit CMYK is defined){hint}")

        def cmyk(block):
            c, m, y, k = (block[..., i].astype(np.float32) for i in range(4))
            return np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255.0

        return cmyk
    if photometric not in (0, 1, 2):
        raise ImageError(f"{name}: photometric interpretation {page.photometric.name} is not supported{hint}")
    extra = len(page.extrasamples or ())
    colour = samples - extra if extra else samples
    if photometric in (0, 1) and colour != 1 or photometric == 2 and colour != 3 or extra > 1:
        raise ImageError(
            f"{name}: {samples} samples per pixel ({page.photometric.name}) are not gray or RGB (multispectral?)"
            f"{hint}"
        )
    invert = photometric == 0  # min-is-white

    def convert(block):
        x = block.astype(np.float32)
        if x.ndim == 2:
            x = x[..., None]
        x = x[..., :colour] * scale
        if invert:
            x = 255.0 - x
        return np.repeat(x, 3, axis=2) if colour == 1 else x

    return convert


def _mpp(tif, page) -> float | None:
    """Microns per pixel at level 0, where the file records it."""
    desc = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", desc)  # Aperio SVS
    if match:
        return float(match.group(1))
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        if match:
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            # OME's default unit is the micrometre; nm and mm files exist
            factor = {"nm": 1e-3, "um": 1.0, "\u00b5m": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(
                unit.group(1) if unit else "um", None)
            return float(match.group(1)) * factor if factor else None
    tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if tag is not None and unit is not None:
        num, den = tag.value
        per_unit = num / den if den else 0
        scale = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre in microns
        if per_unit > 1 and scale:
            return scale / per_unit
    return None


class TiffSource(FileBacked):
    """A (pyramidal) TIFF read lazily by tiles.

    Decoded tiles stay in a small LRU cache (``cache_bytes``, 24 MB by default: 128 RGB
    tiles of 256 px, 32 of 512 px), so the many small reads of one prediction that share a
    tile decode it once, and its memory does not depend on the file's tile size.

    Args:
        path: the file.
        fill: raw value returned outside the image.

    Attributes:
        levels: number of pyramid levels.
        mpp: microns per pixel at level 0, or None.
        pixels_decoded: pixels of all tiles decoded so far (cache hits not counted).
        bytes_read: compressed bytes of those tiles.
    """

    band_pixels = 250_000  # level-0 pixels converted to float at a time where no coarser level exists
    cache_bytes = 24 << 20
    tile_workers = 4  # tiles of one read decoded at once (1: one at a time)

    def __init__(self, path: str | os.PathLike, fill: float = 0.0, max_pixels: int = 256_000_000):
        import tifffile
        import zarr

        self.path, self.fill, self.channels = str(path), float(fill), 3
        self.max_pixels = int(max_pixels)
        self.pixels_decoded = 0
        self.bytes_read = 0
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            axes = series.axes
            if axes not in ("YX", "YXS", "SYX"):
                extra = [n for a, n in zip(axes, series.shape) if a not in "YXS"]
                raise ImageError(
                    f"{path}: holds {math.prod(extra)} images (TIFF axes {axes!r}: pages, planes or time points); "
                    "zoomnet reads one RGB or gray image per file: save each as its own file"
                    if extra and math.prod(extra) > 1 else
                    f"{path}: TIFF axes {axes!r} are not supported; save one RGB or gray image (YX or YXS)"
                )
            self._planar = axes == "SYX"  # separate planes: (S, Y, X)
            self._convert = sample_rule(self._tif, series, self._planar, str(path))
            store = series.aszarr()
            group = zarr.open(store, mode="r")
            arrays = [group[str(i)] for i in range(len(series.levels))] if hasattr(group, "keys") else [group]
            yx = slice(1, 3) if self._planar else slice(0, 2)
            self.height, self.width = series.levels[0].shape[yx]
            if self.height < 1 or self.width < 1:
                raise ImageError(f"{path}: the image is empty ({self.width}x{self.height} pixels); re-export it")
            self._levels = []
            for i, (lv, arr) in enumerate(zip(series.levels, arrays)):
                h, w = lv.shape[yx]
                # a reduced level must keep the image's shape (sizes round either way); a damaged
                # one is left out rather than read with the wrong geometry
                if i and (h < 1 or w < 1 or abs(self.width * h / self.height - w) > 2):
                    continue
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

    def _decode(self, level: int, r: int, c: int) -> np.ndarray:
        """One tile, decoded (thread-safe: tifffile's store reads under its file lock, and the
        codecs decode outside it)."""
        lv = self._levels[level]
        th, tw = lv.tile
        try:
            ys, xs = slice(r * th, min((r + 1) * th, lv.height)), slice(c * tw, min((c + 1) * tw, lv.width))
            return np.moveaxis(np.asarray(lv.array[:, ys, xs]), 0, -1) if self._planar else np.asarray(lv.array[ys, xs])
        except Exception as exc:  # a damaged tile
            raise ImageError(
                f"{self.path}: cannot read the image, pyramid level {level} ({type(exc).__name__}: {exc}); the file "
                "is corrupt or truncated: re-export it"
            ) from None

    def _tiles(self, level: int, keys: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """The decoded tiles ``(row, col)`` of one read: from a small LRU cache (neighbouring
        reads share tiles), the others decoded together in a thread pool (the codecs release
        the GIL; at most ``MAX_TILES_PER_READ`` tiles and ``max_pixels`` pixels, checked
        before). The I/O accounting counts each decoded tile once, as one at a time would."""
        lv = self._levels[level]
        th, tw = lv.tile
        found: dict[tuple[int, int], np.ndarray] = {}
        for rc in keys:
            if (level, *rc) in self._cache:
                self._cache.move_to_end((level, *rc))
                found[rc] = self._cache[(level, *rc)]
        missing = [rc for rc in keys if rc not in found]
        if len(missing) > 1 and self.tile_workers > 1:
            decoded = list(_decoder_pool(self.tile_workers).map(lambda rc: self._decode(level, *rc), missing))
        else:
            decoded = [self._decode(level, *rc) for rc in missing]
        for (r, c), tile in zip(missing, decoded):
            index = r * lv.tiles_across + c
            # the codec decodes whole tiles
            self.count_read(th * tw, int(lv.bytecounts[index]) if index < len(lv.bytecounts) else 0)
            found[(r, c)] = self._cache[(level, r, c)] = tile
            self._cached_bytes += tile.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return found

    def _tile_span(self, level: int, y0: int, x0: int, y1: int, x1: int) -> tuple[range, range]:
        """The tile rows and columns a read of ``[y0, y1) x [x0, x1)`` of a level decodes,
        checked against the pixel budget before anything is allocated or decoded: whole
        tiles (or strips) decode, so a small box of a single-strip level costs the level,
        and 16 px tiles cost a call each.

        Raises:
            ImageError: over ``max_pixels`` or ``MAX_TILES_PER_READ``.
        """
        lv = self._levels[level]
        ya, yb, xa, xb = max(y0, 0), min(y1, lv.height), max(x0, 0), min(x1, lv.width)
        th, tw = lv.tile
        rows = range(ya // th, (yb - 1) // th + 1) if yb > ya else range(0)
        cols = range(xa // tw, (xb - 1) // tw + 1) if xb > xa else range(0)
        decoded = max(len(rows) * len(cols) * th * tw, (y1 - y0) * (x1 - x0))
        if decoded > self.max_pixels or len(rows) * len(cols) > MAX_TILES_PER_READ:
            raise ImageError(
                f"{self.path}: one read would decode {len(rows) * len(cols):,} tiles of {tw}x{th} ({decoded:,} pixels; "
                f"data.max_pixels is {self.max_pixels:,}); save it as a tiled pyramid (e.g. `vips tiffsave IN OUT.tif "
                "--tile --pyramid`) or raise data.max_pixels"
            )
        return rows, cols

    def _read_level(self, level: int, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
        """Pixels ``[y0, y1) x [x0, x1)`` of a level as ``(C, h, w)`` float32, fill outside."""
        lv = self._levels[level]
        ya, yb, xa, xb = max(y0, 0), min(y1, lv.height), max(x0, 0), min(x1, lv.width)
        th, tw = lv.tile
        rows, cols = self._tile_span(level, y0, x0, y1, x1)
        out = torch.full((3, y1 - y0, x1 - x0), self.fill, dtype=torch.float32)
        if yb <= ya or xb <= xa:
            return out
        tiles = self._tiles(level, [(r, c) for r in rows for c in cols])
        parts = []
        for r in rows:
            row = []
            for c in cols:
                tile = tiles[(r, c)]  # (<=th, <=tw, ...)
                ty0, tx0 = r * th, c * tw
                row.append(tile[max(ya - ty0, 0) : min(yb - ty0, th), max(xa - tx0, 0) : min(xb - tx0, tw)])
            parts.append(np.concatenate(row, axis=1))
        block = self._convert(np.concatenate(parts, axis=0))  # (h, w, 3) float32 in 0..255
        pixels = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).permute(2, 0, 1)
        out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = pixels
        return out

    def read(self, box: Box, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        top, left, h, w = (int(v) for v in box)
        if out_size is None or tuple(out_size) == (h, w):
            return self._read_level(0, top, left, top + h, left + w)
        oh, ow = out_size
        level = self.level_for(min(h / oh, w / ow))
        ds = self._levels[level].downsample
        if level == 0:  # no coarser level: a large region is resampled band by band, never whole in float
            if oh <= h and ow <= w and h * w > 4 * self.band_pixels:
                self._tile_span(0, top, left, top + h, left + w)  # the whole read within budget first
                return area_in_bands(lambda a, b: self._read_level(0, top + a, left, top + b, left + w), h, w,
                                     (oh, ow), 3, self.band_pixels)
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
