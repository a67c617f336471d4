"""Stand-ins for the paper's data sets: synthetic images with the geometry of each (image
size, object size and count, number of classes), written by ``zoomnet make-data`` so that
every shipped preset can be trained end to end on a CPU (docs/results.md).

- ``colon-cancer``: 500x500 H&E-like tissue (the real IHC texture of the ``scikit-image``
  wheel, recoloured) with about 150 scattered round nuclei and 1-2 glands (a ring of round
  nuclei around a pale lumen, about 40 px across); positive images also hold 1-3
  epithelial glands, whose 7-11 nuclei are elongated, radial and darker. Binary:
  ``epithelial`` / ``normal``.
- ``traffic-signs``: 1280x960 street-like scenes (sky, facades with windows, trees, a road
  with markings, poles and red or blue discs without text as distractors); three of four
  images hold one speed-limit sign (red ring, white disc, 24-44 px) reading 50, 70 or 80.
  Four classes, as the paper's task ("whether the road-scene image contains a speed limit
  sign (50, 70 or 80 km/h) or not"): ``no-sign``, ``50``, ``70``, ``80``.
- ``fmow``: aerial-like scenes of varying size (600-1400 px: fields, roads, houses)
  holding 1-3 copies of one of ten structures (30-44 px); ten classes, as the paper's
  fMoW subset, scaled to what a CPU can train.

Each function returns ``(image (H, W, 3) uint8, mask (H, W) uint8 in {0, 1}, label)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLON_CLASSES = ("normal", "epithelial")
SIGN_CLASSES = ("no-sign", "50", "70", "80")
NO_SIGN = SIGN_CLASSES[0]
FMOW_CLASSES = (
    "airport", "stadium", "solar-farm", "parking-lot", "pool", "crossroads", "tower", "silo", "port", "helipad",
)


def _disc(img: np.ndarray, cy: float, cx: float, ry: float, rx: float, colour, angle: float = 0.0,
          mask: np.ndarray | None = None) -> None:
    """Paint a filled (rotated) ellipse in place; also mark it in ``mask``."""
    h, w = img.shape[:2]
    r = int(max(ry, rx)) + 2
    y0, y1, x0, x1 = max(int(cy) - r, 0), min(int(cy) + r + 1, h), max(int(cx) - r, 0), min(int(cx) + r + 1, w)
    if y1 <= y0 or x1 <= x0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    img[y0:y1, x0:x1][inside] = colour
    if mask is not None:
        mask[y0:y1, x0:x1][inside] = 1


def colon_image(rng: np.random.Generator, texture: np.ndarray, size: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """A 500x500-like H&E tile; positive ones hold epithelial clusters (see the module)."""
    crop = int(rng.integers(200, 400))
    y, x = rng.integers(0, texture.shape[0] - crop + 1), rng.integers(0, texture.shape[1] - crop + 1)
    patch = np.asarray(Image.fromarray(texture[y : y + crop, x : x + crop]).resize((size, size), Image.BILINEAR), dtype=np.float64)
    gray = patch.mean(axis=2, keepdims=True) / 255.0
    img = np.array([235.0, 175.0, 210.0]) * (0.75 + 0.25 * gray)  # eosin pink, textured
    img += rng.normal(0, 5, img.shape)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(150 * (size / 500) ** 2)):  # ordinary nuclei: small, round, scattered
        r = rng.uniform(3.0, 5.0)
        _disc(img, *rng.uniform(0, size, 2), r, r * rng.uniform(0.8, 1.2), (150.0, 95.0, 165.0), rng.uniform(0, np.pi))
    glands = [True] * int(rng.integers(1, 4)) if positive else []
    glands += [False] * int(rng.integers(1, 3))  # every image also holds ordinary glands
    for epithelial in glands:
        ring = rng.uniform(12, 18)
        cy, cx = rng.uniform(ring + 10, size - ring - 10, 2)
        _disc(img, cy, cx, ring - 3, ring - 3, (242.0, 215.0, 230.0))  # pale lumen
        n = int(rng.integers(7, 12))
        for k in range(n):
            a = 2 * np.pi * k / n + rng.uniform(-0.15, 0.15)
            y, x = cy + ring * np.sin(a), cx + ring * np.cos(a)
            if epithelial:  # elongated, darker nuclei standing radially around the lumen
                _disc(img, y, x, 2.6, 5.5, (115.0, 65.0, 145.0), a, mask)
            else:  # round, ordinary nuclei
                r = rng.uniform(3.0, 4.2)
                _disc(img, y, x, r, r, (150.0, 95.0, 165.0))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def traffic_scene(rng: np.random.Generator, height: int, width: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A street-like scene with one speed-limit sign reading ``kind``, or none when ``kind``
    is ``no-sign`` (see the module)."""
    horizon = int(height * rng.uniform(0.35, 0.5))
    t = (np.arange(height) / max(horizon, 1))[:, None, None]  # sky gradient
    sky = np.array([120.0, 160.0, 220.0]) + np.array([80.0, 60.0, 20.0]) * t
    img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    x = 0
    while x < width:  # facades with windows
        bw, bh = int(rng.integers(80, 260)), int(rng.integers(80, horizon))
        colour = tuple(int(v) for v in rng.integers(90, 200, 3))
        d.rectangle([x, horizon - bh, x + bw, horizon + 40], fill=colour)
        for wy in range(horizon - bh + 10, horizon + 20, 28):
            for wx in range(x + 8, x + bw - 14, 24):
                d.rectangle([wx, wy, wx + 12, wy + 16], fill=(40, 50, 70) if rng.random() < 0.7 else (230, 220, 150))
        x += bw + int(rng.integers(0, 30))
    d.rectangle([0, horizon + 40, width, height], fill=(95, 95, 100))  # road
    for yy in range(horizon + 60, height, 60):
        d.rectangle([width // 2 - 4, yy, width // 2 + 4, yy + 30], fill=(235, 235, 235))
    for _ in range(int(rng.integers(3, 8))):  # trees
        tx, ty, r = int(rng.integers(0, width)), int(rng.integers(horizon - 60, horizon + 60)), int(rng.integers(25, 60))
        d.ellipse([tx - r, ty - r, tx + r, ty + r], fill=(int(rng.integers(30, 70)), int(rng.integers(90, 140)), 40))
    sign_d = int(rng.integers(24, 45))
    distractors = int(rng.integers(2, 5))
    spots = [(int(rng.integers(60, width - 60)), int(rng.integers(horizon - 80, horizon + 80))) for _ in range(distractors + 1)]
    for i, (px, py) in enumerate(spots):  # poles, each with a disc on top
        d.rectangle([px - 2, py, px + 2, min(height - 1, py + int(rng.integers(80, 200)))], fill=(70, 70, 70))
        r = (sign_d if i == 0 else int(rng.integers(20, 45))) // 2
        if i == 0 and kind == NO_SIGN:  # its pole stays: the scene differs only by the sign
            continue
        if i == 0:  # the speed-limit sign
            d.ellipse([px - r, py - r, px + r, py + r], fill=(200, 20, 30))
            inner = max(2, int(r * 0.75))
            d.ellipse([px - inner, py - inner, px + inner, py + inner], fill=(245, 245, 245))
            d.text((px, py), kind, fill=(10, 10, 10), font=_font(max(8, int(inner * 1.05))), anchor="mm")
        else:  # red or blue discs without digits (no-entry, mandatory-direction-like)
            colour = (200, 20, 30) if rng.random() < 0.5 else (30, 60, 190)
            d.ellipse([px - r, py - r, px + r, py + r], fill=colour)
            if rng.random() < 0.5:
                d.rectangle([px - r * 0.6, py - r * 0.15, px + r * 0.6, py + r * 0.15], fill=(245, 245, 245))
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, 4, (height, width, 3))
    mask = Image.new("L", (width, height))
    if kind != NO_SIGN:
        px, py = spots[0]
        r = sign_d // 2
        ImageDraw.Draw(mask).ellipse([px - r, py - r, px + r, py + r], fill=1)
    mask = np.asarray(mask, dtype=np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8), mask


def _structure(kind: str, d: int) -> np.ndarray:
    """``(d, d)`` bool footprint of one of the ten fMoW stand-in structures."""
    yy, xx = np.mgrid[0:d, 0:d] - (d - 1) / 2
    r = np.hypot(yy, xx)
    h = d / 2
    a, b = np.abs(yy), np.abs(xx)
    shapes = {
        "airport": (a < d * 0.12) | ((b < d * 0.12) & (yy > 0)),  # a runway and a taxiway
        "stadium": ((yy / (h * 0.7)) ** 2 + (xx / h) ** 2 <= 1) & ((yy / (h * 0.45)) ** 2 + (xx / (h * 0.75)) ** 2 > 1),
        "solar-farm": ((np.floor(yy + h).astype(int) // 4) % 2 == 0) & (a < h * 0.9) & (b < h * 0.9),
        "parking-lot": ((np.floor(xx + h).astype(int) % 6) < 3) & ((np.floor(yy + h).astype(int) % 9) < 5),
        "pool": (a < h * 0.45) & (b < h * 0.8),
        "crossroads": (a < d * 0.1) | (b < d * 0.1),
        "tower": (r < h * 0.3) | ((r > h * 0.6) & (r < h * 0.75)),
        "silo": (np.hypot(yy, xx - h * 0.45) < h * 0.4) | (np.hypot(yy, xx + h * 0.45) < h * 0.4),
        "port": ((b < h * 0.9) & (yy > h * 0.5)) | ((np.abs(xx % (d / 3)) < 3) & (yy > -h * 0.3)),
        "helipad": ((r > h * 0.75) & (r < h * 0.95)) | (((b > h * 0.2) & (b < h * 0.35) & (a < h * 0.45)) | ((a < h * 0.07) & (b < h * 0.3))),
    }
    return shapes[kind]


STRUCTURE_COLOUR = (215.0, 210.0, 200.0)  # concrete: one colour, so the shape decides the class


def fmow_scene(rng: np.random.Generator, height: int, width: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """An aerial-like scene with 1-3 copies of the structure ``kind`` (see the module)."""
    fields = np.asarray(Image.fromarray(rng.integers(0, 4, (max(2, height // 150), max(2, width // 150)), dtype=np.uint8))
                        .resize((width, height), Image.NEAREST))
    palette = np.array([(110, 130, 80), (150, 140, 95), (90, 115, 70), (165, 155, 120)], dtype=np.float64)
    img = palette[fields] + rng.normal(0, 6, (height, width, 3))
    for _ in range(int(rng.integers(1, 4))):  # roads
        if rng.random() < 0.5:
            y = int(rng.integers(0, height))
            img[max(0, y - 3) : y + 3] = (125, 125, 125)
        else:
            x = int(rng.integers(0, width))
            img[:, max(0, x - 3) : x + 3] = (125, 125, 125)
    for _ in range(int(40 * height * width / 1e6)):  # houses: small roofs everywhere
        cy, cx = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        img[cy : cy + int(rng.integers(4, 9)), cx : cx + int(rng.integers(4, 9))] = rng.integers(120, 200, 3)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        d = int(rng.integers(30, 45))
        fp = _structure(kind, d)
        if rng.random() < 0.5:
            fp = fp.T
        cy, cx = int(rng.integers(0, height - d)), int(rng.integers(0, width - d))
        region = img[cy : cy + d, cx : cx + d]
        region[fp] = STRUCTURE_COLOUR
        mask[cy : cy + d, cx : cx + d] |= fp.astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_colon(save, n: int, size: int | None, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``n`` colon-cancer tiles through ``save(name, image, mask, label)``; the manifest rows."""
    from zoomnet.data.generators.textures import histology_texture

    texture = histology_texture()
    rows = []
    for i in range(n):
        label = COLON_CLASSES[int(rng.random() < 0.5)]
        img, mask = colon_image(rng, texture, size or 500, label == "epithelial")
        rows.append(save(f"colon-cancer_{i:05d}", img, mask, label))
    return rows


def write_traffic(save, n: int, size: int | None, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``n`` street scenes (``size``: their height; 4:3) through ``save``; the manifest rows."""
    rows = []
    for i in range(n):
        label = SIGN_CLASSES[int(rng.integers(0, len(SIGN_CLASSES)))]
        height = size or 960
        img, mask = traffic_scene(rng, height, height * 4 // 3, label)
        rows.append(save(f"traffic-signs_{i:05d}", img, mask, label))
    return rows


def write_fmow(save, n: int, size: int | None, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``n`` aerial scenes of 0.6-1.4 times ``size`` on each side through ``save``; the rows."""
    rows = []
    for i in range(n):
        label = FMOW_CLASSES[int(rng.integers(0, len(FMOW_CLASSES)))]
        side = size or 1000
        h, w = (int(v) for v in rng.integers(int(side * 0.6), int(side * 1.4) + 1, 2))
        img, mask = fmow_scene(rng, h, w, label)
        rows.append(save(f"fmow_{i:05d}", img, mask, label))
    return rows
