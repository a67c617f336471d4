"""``zoomnet make-data slides``: whole-slide images as scanners write them, at real sizes.

A slide is 60,000-200,000 px wide by default, with Camelyon16's aspect (1.25-2 : 1), mostly
white glass with tissue islands covering 15-40 % of it; an SVS-like pyramid (levels at 4x
downsamples, or 2x), JPEG tiles of 512 or 256 px, the pixel size in the metadata (Aperio's
``MPP = `` and the resolution tags); the artefacts real slides carry (pen marks, a fold,
out-of-focus patches); and, on positive slides, lesions that are small against the tissue
(0.01-0.5 % of it; a third of the positives hold a single micro-lesion). The lesions also
go to a mask at 1/16 of level 0, a tiled TIFF read lazily like the slide.

Everything is a function of level-0 coordinates (:class:`Scene`), so the levels agree and
each tile is rendered on its own: memory stays that of a few tiles whatever the slide's
size. A tile of glass alone is the same bytes everywhere: encoded once and written again.
Tiles are rendered and JPEG-encoded in a thread pool (numpy and the codec release the GIL).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zoomnet.data.generators.textures import bilinear, histology_texture

GLASS = np.array([242.0, 240.0, 244.0], dtype=np.float32)
INKS = (np.array([40.0, 110.0, 60.0]), np.array([40.0, 60.0, 150.0]), np.array([30.0, 30.0, 35.0]))
NUCLEUS = np.array([55.0, 35.0, 105.0], dtype=np.float32)
MASK_DOWNSAMPLE = 16


@dataclass
class Lesion:
    """A lesion: centre and mean radius in level-0 pixels, and the harmonics of its outline."""

    y: float
    x: float
    radius: float
    wobble: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # amplitudes and phases of 2 harmonics

    def inside(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Bool mask of points (level-0 coordinates) inside the irregular outline."""
        dy, dx = ys - self.y, xs - self.x
        theta = np.arctan2(dy, dx)
        a3, p3, a5, p5 = self.wobble
        r = self.radius * (1 + a3 * np.sin(3 * theta + p3) + a5 * np.sin(5 * theta + p5))
        return dy * dy + dx * dx <= r * r


@dataclass
class Scene:
    """A synthetic slide as functions of level-0 coordinates."""

    height: int
    width: int
    seed: int = 0
    tissue: float = 0.25  # share of the slide covered by tissue
    lesions: list[Lesion] = field(default_factory=list)
    pens: list[tuple[np.ndarray, float, np.ndarray]] = field(default_factory=list)  # (points (P, 2), width, ink)
    folds: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)  # (point, normal, half width)
    blurs: list[tuple[float, float, float]] = field(default_factory=list)  # (y, x, radius)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        tex = histology_texture().astype(np.float32)  # (512, 512, 3)
        tile = np.concatenate([tex, tex[:, ::-1]], axis=1)
        self._texture0 = np.concatenate([tile, tile[::-1]], axis=0)  # (1024, 1024, 3), seamless
        self._textures: dict[int, np.ndarray] = {}
        self._nuclei0 = _nuclei_texture(rng)
        # tissue islands: a smooth random field on a coarse grid, thresholded to the asked share
        self.cell = max(2048.0, min(self.height, self.width) / 6)
        gh, gw = int(self.height / self.cell) + 2, int(self.width / self.cell) + 2
        self.field = rng.standard_normal((gh, gw)).astype(np.float32)
        fine = self.tissue_field(*np.meshgrid(np.linspace(0, self.height, 256), np.linspace(0, self.width, 256),
                                              indexing="ij"))
        self.threshold = float(np.quantile(fine, 1.0 - self.tissue))

    # ---------------------------------------------------------------- fields of level 0
    def tissue_field(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """The bilinear random field at level-0 points."""
        return bilinear(self.field, ys / self.cell, xs / self.cell)

    def tissue_weight(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Tissue in [0, 1] at level-0 points: the field above the threshold, soft at the edge."""
        return np.clip((self.tissue_field(ys, xs) - self.threshold) * 6.0, 0.0, 1.0)

    def _texture(self, ds: int, blurred: bool = False) -> np.ndarray:
        """The mirror-tiled texture averaged over ``ds`` x ``ds`` blocks (``blurred``: 8x more)."""
        key = ds * (8 if blurred else 1)
        if key not in self._textures:
            self._textures[key] = _box_down(self._texture0, key)
        return self._textures[key]

    # ---------------------------------------------------------------- what a tile needs
    def touches(self, top: int, left: int, h: int, w: int) -> bool:
        """Whether a level-0 box may show anything but glass (tissue, ink, a lesion). The
        field is bilinear between grid lines, so its maximum over the box is at the box's
        corners, the grid lines' crossings of its edges, or the grid points inside it."""
        def stops(a: float, b: float) -> np.ndarray:
            inner = np.arange(math.ceil(a / self.cell), math.floor(b / self.cell) + 1) * self.cell
            return np.unique(np.concatenate([[a, b], inner[(inner > a) & (inner < b)]]))

        ys, xs = np.meshgrid(stops(top, top + h), stops(left, left + w), indexing="ij")
        if self.tissue_field(ys, xs).max() > self.threshold:
            return True
        return any(_segments_near(points, width, top, left, h, w) for points, width, _ in self.pens)

    def render(self, ds: int, top: int, left: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[top, top + h) x [left, left + w)`` of the level of downsample ``ds`` as
        ``(h, w, 3)`` uint8 (coordinates in that level's pixels)."""
        rows, cols = np.arange(top, top + h), np.arange(left, left + w)
        box = (top * ds, left * ds, h * ds, w * ds)  # in level-0 pixels
        points: list[np.ndarray] = []

        def at():  # level-0 coordinates of the pixel centres, made once if anything needs them
            if not points:
                ys = np.broadcast_to(((rows + 0.5) * ds)[:, None].astype(np.float32), (h, w))
                points.extend([ys, np.broadcast_to(((cols + 0.5) * ds)[None, :].astype(np.float32), (h, w))])
            return points

        img = _periodic(self._texture(ds), rows, cols)  # (h, w, 3)
        for by, bx, br in self.blurs:  # out of focus: the texture of a coarser level
            if _box_near(by, bx, br, *box):
                ys, xs = at()
                near = (ys - by) ** 2 + (xs - bx) ** 2 <= br * br
                blurred = _periodic(self._texture(ds, blurred=True), rows // 8, cols // 8)  # 8x coarser pixels
                img = np.where(near[..., None], blurred, img)
        for point, normal, half in self.folds:  # tissue folded over itself: darker, more stain
            corners = [(y - point[0]) * normal[0] + (x - point[1]) * normal[1]
                       for y in (box[0], box[0] + box[2]) for x in (box[1], box[1] + box[3])]
            if min(corners) <= half and max(corners) >= -half:  # the band crosses the box
                ys, xs = at()
                inside = np.abs((ys - point[0]) * normal[0] + (xs - point[1]) * normal[1]) <= half
                img = np.where(inside[..., None], img * 0.62, img)
        for lesion in self.lesions:
            if _box_near(lesion.y, lesion.x, lesion.radius * 1.5, *box):
                inside = lesion.inside(*at())
                nuclei = _periodic(self._nuclei_at(ds), rows, cols)
                img = np.where(inside[..., None], img * (1 - nuclei[..., 3:]) + nuclei[..., :3], img)
        weight = self._weight_grid(ds, top, left, h, w, step=max(1, min(8, 32 // ds)))[..., None]
        img = img * weight + GLASS * (1 - weight)
        for line, width, ink in self.pens:
            if _segments_near(line, width, *box):
                d = _distance_to_polyline(*at(), line)
                stroke = np.clip((width / 2 - d) / max(ds, 1.0), 0.0, 1.0)[..., None] * 0.8
                img = img * (1 - stroke) + ink * stroke
        return np.clip(img, 0, 255).astype(np.uint8)

    def _weight_grid(self, ds: int, top: int, left: int, h: int, w: int, step: int = 8) -> np.ndarray:
        """Tissue weight of a box of the level, evaluated every ``step`` pixels and repeated:
        the field changes over thousands of level-0 pixels, so this is the same picture at
        a fraction of the cost."""
        gy = ((np.arange(top, top + h, step) + step / 2) * ds).astype(np.float32)
        gx = ((np.arange(left, left + w, step) + step / 2) * ds).astype(np.float32)
        coarse = self.tissue_weight(*np.meshgrid(gy, gx, indexing="ij")).astype(np.float32)
        return np.repeat(np.repeat(coarse, step, axis=0), step, axis=1)[:h, :w]

    def _nuclei_at(self, ds: int) -> np.ndarray:
        key = -ds
        if key not in self._textures:
            self._textures[key] = _box_down(self._nuclei0, ds)
        return self._textures[key]

    def mask(self, top: int, left: int, h: int, w: int, ds: int) -> np.ndarray:
        """Lesion mask (0/255 uint8) of a box of the level of downsample ``ds``."""
        ys = ((np.arange(top, top + h) + 0.5) * ds)[:, None]
        xs = ((np.arange(left, left + w) + 0.5) * ds)[None, :]
        out = np.zeros((h, w), np.uint8)
        for lesion in self.lesions:
            if _box_near(lesion.y, lesion.x, lesion.radius * 1.5, top * ds, left * ds, h * ds, w * ds):
                out[lesion.inside(np.broadcast_to(ys, (h, w)), np.broadcast_to(xs, (h, w)))] = 255
        return out


def _periodic(texture: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    p, q = texture.shape[:2]
    return texture[(rows % p)[:, None], (cols % q)[None, :]]


def _box_down(texture: np.ndarray, ds: int) -> np.ndarray:
    """``texture`` averaged over ``ds`` x ``ds`` blocks (its mean colour past its period)."""
    p = texture.shape[0]
    if ds <= 1:
        return texture
    if ds >= p:
        return texture.reshape(-1, texture.shape[2]).mean(0)[None, None, :]
    return texture.reshape(p // ds, ds, p // ds, ds, -1).mean(axis=(1, 3))


def _nuclei_texture(rng: np.random.Generator, period: int = 512) -> np.ndarray:
    """A periodic ``(period, period, 4)`` layer of densely packed dark nuclei: colour times
    opacity in the first three channels, opacity in the last."""
    out = np.zeros((period, period, 4), np.float32)
    yy, xx = np.mgrid[-6:7, -6:7].astype(np.float32)  # a window around each nucleus
    for _ in range(900):
        cy, cx, r = int(rng.integers(0, period)), int(rng.integers(0, period)), rng.uniform(2.0, 4.5)
        disc = yy * yy + xx * xx <= r * r
        rows, cols = (cy + yy[disc].astype(int)) % period, (cx + xx[disc].astype(int)) % period
        out[rows, cols, :3] = NUCLEUS * 0.9
        out[rows, cols, 3] = 0.9
    return out


def _box_near(y: float, x: float, r: float, top: float, left: float, h: float, w: float) -> bool:
    return y + r >= top and y - r <= top + h and x + r >= left and x - r <= left + w


def _segments_near(points: np.ndarray, width: float, top: float, left: float, h: float, w: float) -> bool:
    lo, hi = points.min(0) - width, points.max(0) + width
    return hi[0] >= top and lo[0] <= top + h and hi[1] >= left and lo[1] <= left + w


def _distance_to_polyline(ys: np.ndarray, xs: np.ndarray, points: np.ndarray) -> np.ndarray:
    best = np.full(ys.shape, np.inf, np.float32)
    for (ay, ax), (by, bx) in zip(points[:-1], points[1:]):
        vy, vx = by - ay, bx - ax
        t = np.clip(((ys - ay) * vy + (xs - ax) * vx) / max(vy * vy + vx * vx, 1e-9), 0.0, 1.0)
        best = np.minimum(best, np.hypot(ys - (ay + t * vy), xs - (ax + t * vx)))
    return best


def scene(height: int, width: int, seed: int, lesions: int, micro: bool) -> Scene:
    """A slide's scene: tissue share, artefacts and lesions drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    s = Scene(height, width, seed, tissue=float(rng.uniform(0.15, 0.40)))
    for _ in range(int(rng.integers(1, 3))):  # pen marks near the edge of the slide
        start = np.array([rng.uniform(0.05, 0.95) * height, rng.uniform(0.02, 0.2) * width])
        steps = rng.normal(0, 0.03, (int(rng.integers(3, 7)), 2)) * [height, width] + [0.0, 0.04 * width]
        s.pens.append((np.cumsum(np.vstack([start, steps]), 0), float(rng.uniform(25, 60)),
                       INKS[int(rng.integers(0, len(INKS)))]))
    angle = rng.uniform(0, np.pi)
    s.folds.append((np.array([rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width]),
                    np.array([np.cos(angle), np.sin(angle)]), float(rng.uniform(150, 400))))
    s.blurs = [(rng.uniform(0, height), rng.uniform(0, width), float(rng.uniform(1500, 4000)))
               for _ in range(int(rng.integers(1, 3)))]
    tissue_area = s.tissue * height * width
    shares = [rng.uniform(0.0001, 0.0003)] if micro else list(rng.uniform(0.0005, 0.005, lesions) / max(lesions, 1))
    for share in shares[:lesions] if lesions else []:
        radius = math.sqrt(share * tissue_area / math.pi)
        for _ in range(200):  # a centre on tissue, well inside it
            cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
            if s.tissue_weight(np.array([cy]), np.array([cx]))[0] >= 1.0:
                break
        s.lesions.append(Lesion(float(cy), float(cx), radius, tuple(rng.uniform([0, 0, 0, 0], [0.15, 6.3, 0.08, 6.3]))))
    return s


def level_sizes(height: int, width: int, downsample: int, tile: int) -> list[tuple[int, int]]:
    """Level 0 and its reductions by ``downsample`` until a level fits in a tile or two."""
    sizes = [(height, width)]
    while max(sizes[-1]) > 2 * tile:
        h, w = sizes[-1]
        sizes.append((max(1, math.ceil(h / downsample)), max(1, math.ceil(w / downsample))))
    return sizes


def _tiles(scene_: Scene, level_hw: tuple[int, int], ds: int, tile: int, quality: int, pool: ThreadPoolExecutor,
           bar, glass: bytes):
    """The JPEG tiles of one level in row-major order; glass alone is the cached ``glass``."""
    import imagecodecs

    h, w = level_hw

    def one(rc: tuple[int, int]) -> bytes:
        top, left = rc[0] * tile, rc[1] * tile
        if not scene_.touches(top * ds, left * ds, tile * ds, tile * ds):
            return glass
        block = scene_.render(ds, top, left, tile, tile)  # edge tiles rendered whole: outside is still glass
        return imagecodecs.jpeg_encode(block, level=quality)

    keys = [(r, c) for r in range(math.ceil(h / tile)) for c in range(math.ceil(w / tile))]
    ahead = 64  # tiles in flight: memory of a few tiles whatever the slide's size
    futures = [pool.submit(one, k) for k in keys[:ahead]]
    for i in range(len(keys)):
        if i + ahead < len(keys):
            futures.append(pool.submit(one, keys[i + ahead]))
        data, futures[i] = futures[i].result(), None
        bar.update(1)
        yield data


def write_slide(out: Path, height: int, width: int, seed: int = 0, lesions: int = 0, micro: bool = False,
                tile: int = 512, downsample: int = 4, mpp: float = 0.25, quality: int = 80, workers: int = 2,
                mask: Path | None = None, progress: bool = True) -> Scene:
    """Write one slide (a BigTIFF with the levels in SubIFDs) and, with ``mask``, its lesion
    mask at 1/16 as a tiled TIFF; returns its scene."""
    import imagecodecs
    import tifffile

    s = scene(height, width, seed, lesions, micro)
    sizes = level_sizes(height, width, downsample, tile)
    glass = imagecodecs.jpeg_encode(np.broadcast_to(GLASS.astype(np.uint8), (tile, tile, 3)).copy(), level=quality)
    total = sum(math.ceil(h / tile) * math.ceil(w / tile) for h, w in sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    description = f"Aperio Image Library synthetic | {width}x{height} ({tile}x{tile}) JPEG/RGB Q={quality}|MPP = {mpp}"
    kw = dict(tile=(tile, tile), compression="jpeg", photometric="rgb", dtype=np.uint8)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="zoomnet-slide") as pool, \
            tqdm(total=total, desc=out.name, unit="tile", disable=not progress) as bar, \
            tifffile.TiffWriter(out, bigtiff=True) as tw:
        for level, (h, w) in enumerate(sizes):
            ds = downsample ** level
            extra = dict(subifds=len(sizes) - 1, description=description, resolution=(1e4 / mpp, 1e4 / mpp),
                         resolutionunit="CENTIMETER") if level == 0 else dict(subfiletype=1)
            tw.write(_tiles(s, (h, w), ds, tile, quality, pool, bar, glass), shape=(h, w, 3), **kw, **extra)
    if mask is not None:
        _write_mask(s, mask, height, width)
    return s


def _write_mask(s: Scene, path: Path, height: int, width: int, tile: int = 512) -> None:
    """The lesion mask at 1/16 of level 0, a deflate-tiled TIFF (read lazily, by tiles)."""
    import tifffile

    h, w = math.ceil(height / MASK_DOWNSAMPLE), math.ceil(width / MASK_DOWNSAMPLE)

    def tiles():
        for r in range(math.ceil(h / tile)):
            for c in range(math.ceil(w / tile)):
                yield s.mask(r * tile, c * tile, tile, tile, MASK_DOWNSAMPLE)

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, tiles(), shape=(h, w), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     photometric="minisblack")


def write_cohort(out: Path, n: int, size: int | None, seed: int, rng: np.random.Generator, progress: bool = True,
                 tile: int = 512, downsample: int = 4) -> list[tuple[str, str, str]]:
    """``make-data slides``: ``n`` slides 30-100 % of ``size`` (default 200,000) px wide, half
    of them ``tumor`` (a third of those with one micro-lesion); the manifest rows. Each
    slide's lesions also go to ``OUT.lesions.json``."""
    top = size or 200_000
    rows = []
    for i in tqdm(range(n), desc="slides", unit="slide", disable=not progress):
        width = int(rng.uniform(0.3, 1.0) * top) // 16 * 16
        height = int(width / rng.uniform(1.25, 2.0)) // 16 * 16
        positive = i % 2 == 1
        micro = positive and i % 6 == 1
        name = f"slide_{i:05d}"
        s = write_slide(out / "images" / f"{name}.tif", height, width, seed=seed * 100003 + i,
                        lesions=int(rng.integers(1, 4)) if positive else 0, micro=micro, tile=tile,
                        downsample=downsample, mask=out / "masks" / f"{name}.tif", progress=False)
        meta = {"height": height, "width": width, "tissue": s.tissue,
                "lesions": [{"y": les.y, "x": les.x, "radius": les.radius} for les in s.lesions]}
        (out / "images" / f"{name}.lesions.json").write_text(json.dumps(meta, indent=1))
        rows.append((f"images/{name}.tif", "tumor" if positive else "normal", f"masks/{name}.tif"))
    return rows
