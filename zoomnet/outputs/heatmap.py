"""Pictures of where the model looked.

One PNG per image: on the left, a view of the image (up to 2048 px on its long side by
default) with the attention density overlaid (level-1 attention over the whole image;
inside each drawn tile, level-1 times level-2 attention), the sampled sub-tile boxes drawn,
brighter for larger weights, the tissue outline when the model masks tissue, and a colour
bar of the attention scale; on the right, a strip of the sub-tiles with the largest
weights, at full resolution, with their weights.

:mod:`zoomnet.outputs.attention_tiff` writes the same density at the file's level-0 size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from zoomnet.core.geometry import Box
from zoomnet.core.source import ImageSource
from zoomnet.model import ZoomInOutput

# Anchors of a perceptually ordered dark-to-bright colour map (black, purple, orange, yellow).
_ANCHORS = np.array(
    [[0, 0, 4], [60, 15, 110], [150, 40, 100], [230, 90, 40], [250, 190, 40], [252, 255, 164]],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 (``(..., 3)``)."""
    x = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (x - lo)[..., None]
    return (_ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t).astype(np.uint8)


def attention_density(out: ZoomInOutput, index: int, height: int, width: int, size: tuple[int, int],
                      strides: list[tuple[float, float]]) -> np.ndarray:
    """Attention mass per full-resolution pixel, rendered at ``size`` (``(h, w)``)."""
    sy, sx = size[0] / height, size[1] / width
    density = np.zeros(size, dtype=np.float64)
    level1 = out.levels[0]
    (whole, alpha), = level1.maps[index].items()
    g_h, g_w = level1.grid
    t_h, t_w = strides[0]
    cell_area = t_h * t_w
    a = alpha.detach().cpu().view(g_h, g_w).double()[None, None] / cell_area
    up = F.interpolate(a, size=(round(g_h * t_h * sy), round(g_w * t_w * sx)), mode="nearest")[0, 0]
    h, w = min(size[0], up.shape[0]), min(size[1], up.shape[1])
    density[:h, :w] = up[:h, :w].numpy()
    if len(out.levels) > 1:
        tile_mass = {s.box: float(alpha[s.cell]) for s in out.levels[0].samples[index]}
        g2 = out.levels[1].grid
        t2_h, t2_w = strides[1]
        for parent, beta in out.levels[1].maps[index].items():
            if parent not in tile_mass:
                continue
            b = beta.detach().cpu().view(*g2).double()[None, None] * tile_mass[parent] / (t2_h * t2_w)
            # cells are centred on the parent region's own grid, starting at its top-left
            top, left = round(parent.top * sy), round(parent.left * sx)
            hh, ww = max(1, round(g2[0] * t2_h * sy)), max(1, round(g2[1] * t2_w * sx))
            patch = F.interpolate(b, size=(hh, ww), mode="nearest")[0, 0].numpy()
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + hh, size[0]), min(left + ww, size[1])
            if y1 > y0 and x1 > x0:
                density[y0:y1, x0:x1] = patch[y0 - top : y1 - top, x0 - left : x1 - left]
    return density


def _font(size: int):
    try:  # Pillow >= 10.1 scales its built-in font
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _colour_bar(height: int, font, text_px: int) -> Image.Image:
    """A vertical bar of the overlay's colour scale (square-root of the density over its
    maximum), labelled in shares of the image's peak attention density."""
    width = 14 + 5 * text_px
    bar = Image.new("RGB", (width, height), (255, 255, 255))
    top = 2 * text_px
    inner = max(8, height - top - text_px)
    ramp = np.linspace(1, 0, inner)[:, None].repeat(14, axis=1)
    bar.paste(Image.fromarray(colormap(ramp)), (4, top))
    draw = ImageDraw.Draw(bar)
    for share in (1.0, 0.25, 0.05, 0.0):
        y = top + round((1 - np.sqrt(share)) * (inner - 1))
        draw.line([(18, y), (22, y)], fill=(0, 0, 0))
        draw.text((24, y - text_px // 2), f"{share:g}", fill=(0, 0, 0), font=font)
    draw.text((2, 0), "attention", fill=(0, 0, 0), font=font)
    return bar


def _view_panel(source: ImageSource, out: ZoomInOutput, index: int, size: tuple[int, int],
                strides: list[tuple[float, float]], tissue: bool) -> np.ndarray:
    """The image at ``size`` with the attention density overlaid (and the tissue outlined)."""
    height, width = source.height, source.width
    view = source.read(Box(0, 0, height, width), size).clamp(0, 255).permute(1, 2, 0).numpy()
    density = attention_density(out, index, height, width, size, strides)
    level = np.sqrt(density / density.max()) if density.max() > 0 else density
    panel = (0.45 * view + 0.55 * colormap(level).astype(np.float64)).clip(0, 255).astype(np.uint8)
    if tissue:
        from zoomnet.core.tissue import tissue_map

        mask = tissue_map(torch.from_numpy(view).permute(2, 0, 1).float()).numpy()
        padded = np.pad(mask, 1, mode="edge")
        inner = padded[2:, 1:-1] & padded[:-2, 1:-1] & padded[1:-1, 2:] & padded[1:-1, :-2]
        panel[mask & ~inner] = (40, 220, 90)  # tissue pixels with a glass neighbour
    return panel


def _draw_boxes(panel: Image.Image, leaves: list, scale: float, line: int) -> None:
    """The sampled sub-tiles' boxes, brighter for larger weights."""
    draw = ImageDraw.Draw(panel)
    wmax = max((s.weight for s in leaves), default=1.0) or 1.0
    for s in leaves:
        b = s.box
        shade = int(120 + 135 * max(0.0, min(1.0, s.weight / wmax)))
        draw.rectangle(
            [b.left * scale, b.top * scale, (b.left + b.width) * scale - 1, (b.top + b.height) * scale - 1],
            outline=(0, shade, shade), width=line,
        )


def _top_strip(source: ImageSource, leaves: list, height: int, top: int, font, text_px: int) -> Image.Image:
    """The distinct sub-tiles with the largest weights, at full resolution, enlarged, with
    their weights, in a strip ``height`` px high."""
    distinct: list = []
    for s in leaves:
        if s.box not in [d.box for d in distinct]:
            distinct.append(s)
    distinct = distinct[:top]
    label = text_px + 6
    cell = max(64, height // max(top, 1) - label)
    strip = Image.new("RGB", (cell + 16, height), (255, 255, 255))
    sd = ImageDraw.Draw(strip)
    for i, s in enumerate(distinct):
        y = 4 + i * (cell + label)
        if y + cell + label - 4 > height:
            break
        pix = source.read(s.box).clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)
        strip.paste(Image.fromarray(pix).resize((cell, cell), Image.NEAREST), (8, y))
        sd.text((8, y + cell + 2), f"w={s.weight:.3f}", fill=(0, 0, 0), font=font)
    return strip


def render_heatmap(
    source: ImageSource,
    out: ZoomInOutput,
    index: int,
    path: str | Path,
    strides: list[tuple[float, float]],
    title: str = "",
    display: int = 2048,
    top: int = 6,
    tissue: bool = False,
) -> Path:
    """Write the picture of image ``index`` of ``out`` to ``path`` (PNG).

    Args:
        source: the image (its view is read at display size).
        out: the model output that holds the image.
        index: position of the image in the batch.
        path: where to write.
        strides: cell stride of each level (``LevelConfig.cell_stride()``).
        title: text written above the picture (e.g. the prediction).
        display: longest side of the view panel in pixels, at most (an image smaller
            than that is shown at least 512 px wide, enlarged).
        top: number of sub-tiles in the strip.
        tissue: outline the tissue (the model's tissue mask, Otsu on saturation).
    """
    height, width = source.height, source.width
    display = min(display, max(512, height, width))
    scale = display / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    text_px = max(11, display // 80)
    font = _font(text_px)
    panel = Image.fromarray(_view_panel(source, out, index, size, strides, tissue))
    leaves = sorted(out.levels[-1].samples[index], key=lambda s: -s.weight)
    _draw_boxes(panel, leaves, scale, max(2, display // 400))
    strip = _top_strip(source, leaves, size[0], top, font, text_px)
    bar = _colour_bar(size[0], font, text_px)
    header = 2 * text_px
    canvas = Image.new("RGB", (size[1] + bar.width + strip.width, size[0] + header), (255, 255, 255))
    canvas.paste(panel, (0, header))
    canvas.paste(bar, (size[1], header))
    canvas.paste(strip, (size[1] + bar.width, header))
    ImageDraw.Draw(canvas).text((6, text_px // 2), title, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def render_batch(model, sources, out: ZoomInOutput, paths, titles=None, display: int = 2048) -> list[Path]:
    """:func:`render_heatmap` for every image of a batch."""
    strides = [lv.cell_stride() for lv in model.config.levels]
    titles = titles or [""] * len(sources)
    tissue = model.config.tissue_mask
    return [render_heatmap(s, out, i, p, strides, t, display=display, tissue=tissue)
            for i, (s, p, t) in enumerate(zip(sources, paths, titles))]


__all__ = ["attention_density", "colormap", "render_batch", "render_heatmap"]
