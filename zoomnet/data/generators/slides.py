"""``zoomnet make-data gigapixel OUT --size S``: a synthetic whole-slide image as a JPEG-tiled
pyramidal TIFF (level 0 plus 2x reductions in SubIFDs, as OME-TIFF), streamed tile by tile
so that level 0 is never held in memory.

Texture: the real immunohistochemistry image shipped in the ``scikit-image`` wheel, mirror-
tiled, on tissue islands (a smooth random field) over a white bright-field background, with
a few tiny lesions (dense clusters of dark nuclei) whose positions are written beside the
image as ``OUT.lesions.json`` and as a positive-class mask of the coarse level. Every level
is rendered from the same functions of full-resolution coordinates, so the levels agree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from zoomnet.data.generators.textures import bilinear, histology_texture

TILE = 256
WHITE = np.array([242.0, 240.0, 244.0])


class SlideModel:
    """The synthetic slide as functions of full-resolution coordinates."""

    def __init__(self, size: int, seed: int = 0, lesions: int = 3, lesion_radius: float | tuple[float, float] = 40.0):
        rng = np.random.default_rng(seed)
        self.size = size
        tex = histology_texture().astype(np.float32)  # (512, 512, 3)
        tile = np.concatenate([tex, tex[:, ::-1]], axis=1)
        self.period = 2 * tex.shape[0]
        self.texture0 = np.concatenate([tile, tile[::-1]], axis=0)  # (1024, 1024, 3), seamless
        self._textures: dict[int, np.ndarray] = {}
        cells = max(4, size // 2048)  # tissue islands a few thousand pixels across
        self.field = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
        self.field_step = size / cells
        self.lesions = []
        for _ in range(lesions):
            radius = float(rng.uniform(*lesion_radius)) if isinstance(lesion_radius, tuple) else float(lesion_radius)
            for _ in range(100):
                cy, cx = rng.uniform(radius * 2, size - radius * 2, 2)
                if self._tissue(np.array([[cy]]), np.array([[cx]]))[0, 0] > 0.3:
                    break
            nuclei = []
            # 240 nuclei in a lesion of radius 40 (the default), the same density in larger ones
            for _ in range(int(240 * max(1.0, (radius / 40.0) ** 2))):
                a, d = rng.uniform(0, 2 * np.pi), radius * math.sqrt(rng.uniform())
                nuclei.append((cy + d * math.sin(a), cx + d * math.cos(a), rng.uniform(2.0, 4.0)))
            self.lesions.append({"y": float(cy), "x": float(cx), "radius": radius, "nuclei": nuclei})

    def _texture(self, downsample: int) -> np.ndarray:
        if downsample not in self._textures:
            if downsample >= self.period:
                mean = self.texture0.reshape(-1, 3).mean(0)
                self._textures[downsample] = mean[None, None, :]
            else:
                t = torch.from_numpy(self.texture0).permute(2, 0, 1)[None]
                self._textures[downsample] = F.avg_pool2d(t, downsample)[0].permute(1, 2, 0).numpy()
        return self._textures[downsample]

    def _tissue(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Smooth tissue weight in [0, 1] at full-resolution points (bilinear random field)."""
        v = bilinear(self.field, ys / self.field_step, xs / self.field_step)
        return np.clip((v + 0.2) * 4.0, 0.0, 1.0)

    def render(self, level: int, top: int, left: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[top, top+h) x [left, left+w)`` of pyramid level ``level`` (uint8 RGB)."""
        ds = 2 ** level
        y0, y1, x0, x1 = top * ds, (top + h) * ds, left * ds, (left + w) * ds
        near_lesion = any(
            les["y"] + les["radius"] + 5 >= y0 and les["y"] - les["radius"] - 5 <= y1
            and les["x"] + les["radius"] + 5 >= x0 and les["x"] - les["radius"] - 5 <= x1
            for les in self.lesions
        )
        if not near_lesion:
            # bare background: a bilinear field stays within the values of the grid points
            # around the tile, so if all of them are below the tissue threshold, so is the tile
            n = self.field.shape[0] - 1
            iy0, iy1 = min(int(y0 // self.field_step), n), min(int(math.ceil(y1 / self.field_step)), n)
            ix0, ix1 = min(int(x0 // self.field_step), n), min(int(math.ceil(x1 / self.field_step)), n)
            if self.field[iy0 : iy1 + 1, ix0 : ix1 + 1].max() <= -0.2:
                return np.broadcast_to(WHITE.astype(np.uint8), (h, w, 3)).copy()
        tex = self._texture(ds)
        rows = np.arange(top, top + h)
        cols = np.arange(left, left + w)
        if tex.shape[0] == 1:
            img = np.broadcast_to(tex, (h, w, 3)).astype(np.float32)
        else:
            p = tex.shape[0]
            img = tex[(rows % p)[:, None], (cols % p)[None, :]]
        cy = (rows + 0.5) * ds
        cx = (cols + 0.5) * ds
        tissue = self._tissue(cy[:, None], cx[None, :])[..., None]
        img = img * tissue + WHITE * (1 - tissue)
        for lesion in self.lesions:
            r = lesion["radius"] + 5
            if lesion["y"] + r < y0 or lesion["y"] - r > y1 or lesion["x"] + r < x0 or lesion["x"] - r > x1:
                continue
            for ny, nx, nr in lesion["nuclei"]:
                py, px, pr = ny / ds - top, nx / ds - left, max(nr / ds, 0.6)
                ya, yb = int(max(py - pr - 1, 0)), int(min(py + pr + 2, h))
                xa, xb = int(max(px - pr - 1, 0)), int(min(px + pr + 2, w))
                if yb <= ya or xb <= xa:
                    continue
                yy, xx = np.mgrid[ya:yb, xa:xb]
                disc = (yy + 0.5 - py) ** 2 + (xx + 0.5 - px) ** 2 <= pr * pr
                img[ya:yb, xa:xb][disc] = [55.0, 35.0, 105.0]
        return np.clip(img, 0, 255).astype(np.uint8)


def write_gigapixel(out: str | Path, size: int = 50_000, seed: int = 0, quality: int = 85, progress: bool = True,
                    lesions: int = 3, mask: str | Path | None = None,
                    lesion_radius: float | tuple[float, float] = 40.0) -> Path:
    """Write the synthetic slide to ``out`` (a ``.tif``); returns its path. ``lesions``:
    how many (0: a negative slide); ``mask``: also write the lesions as a PNG mask at 1/16
    of level 0 (masks map to their image by the ratio of sizes)."""
    import tifffile

    out = Path(out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        out = out / f"slide_{size}.tif" if out.suffix == "" else out.with_suffix(".tif")
    out.parent.mkdir(parents=True, exist_ok=True)
    slide = SlideModel(size, seed, lesions=lesions, lesion_radius=lesion_radius)
    levels = []
    s = size
    while True:
        levels.append(s)
        if s <= 2 * TILE:
            break
        s = math.ceil(s / 2)
    total = sum(math.ceil(n / TILE) ** 2 for n in levels)
    bar = tqdm(total=total, desc=f"gigapixel {size}x{size}", unit="tile", disable=not progress)

    def tiles(level: int, n: int):
        for ty in range(0, n, TILE):
            for tx in range(0, n, TILE):
                h, w = min(TILE, n - ty), min(TILE, n - tx)
                block = slide.render(level, ty, tx, h, w)
                if (h, w) != (TILE, TILE):  # edge tiles are padded to the full tile size
                    padded = np.zeros((TILE, TILE, 3), np.uint8)
                    padded[:h, :w] = block
                    block = padded
                bar.update(1)
                yield block

    kw = dict(tile=(TILE, TILE), compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
              dtype=np.uint8)
    mpp = 0.5
    with tifffile.TiffWriter(out, bigtiff=True) as tw:
        tw.write(tiles(0, levels[0]), shape=(levels[0], levels[0], 3), subifds=len(levels) - 1,
                 resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **kw)
        for level, n in enumerate(levels[1:], start=1):
            tw.write(tiles(level, n), shape=(n, n, 3), subfiletype=1, **kw)
    bar.close()
    meta = {"size": size, "mpp": mpp, "lesions": [{k: v for k, v in les.items() if k != "nuclei"} for les in slide.lesions]}
    out.with_suffix(".lesions.json").write_text(json.dumps(meta, indent=2))
    if mask is not None:
        from PIL import Image, ImageDraw

        side = max(1, math.ceil(size / 16))
        img = Image.new("L", (side, side))
        draw = ImageDraw.Draw(img)
        for les in slide.lesions:
            y, x, r = les["y"] / 16, les["x"] / 16, les["radius"] / 16
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        img.save(mask)
    return out


def write_cohort(out: Path, n: int, size: int | None, seed: int, rng: np.random.Generator,
                 progress: bool = True) -> list[tuple[str, str, str]]:
    """``make-data camelyon16``: ``n`` pyramidal TIFF slides of ``size`` (8192) px, every other
    one with 1-3 lesions of 100-250 px radius, masks at 1/16; the manifest rows."""
    rows = []
    for i in tqdm(range(n), desc="camelyon16", unit="slide", disable=not progress):
        positive = i % 2 == 1  # balanced: every other slide holds 1-3 lesions
        name = f"slide_{i:05d}"
        write_gigapixel(out / "images" / f"{name}.tif", size=size or 8192, seed=seed * 100003 + i, progress=False,
                        lesions=int(rng.integers(1, 4)) if positive else 0, mask=out / "masks" / f"{name}.png",
                        lesion_radius=(100.0, 250.0))
        rows.append((f"images/{name}.tif", "tumor" if positive else "normal", f"masks/{name}.png"))
    return rows
