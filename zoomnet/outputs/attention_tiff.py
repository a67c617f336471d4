"""The attention as a pyramidal TIFF at the file's level-0 size, which QuPath or any slide
viewer overlays on the slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zoomnet.core.source import ImageSource
from zoomnet.model import ZoomInOutput
from zoomnet.outputs.heatmap import attention_density, colormap
from zoomnet.sources.base import level0_size


def write_attention_tiff(
    source: ImageSource, out: ZoomInOutput, index: int, path: str | Path,
    strides: list[tuple[float, float]], tile: int = 512,
) -> Path:
    """The attention density of image ``index`` as a colour-mapped RGB pyramidal TIFF at
    the level-0 size of the original file (the frame QuPath shows the slide in), tiled and
    compressed, with half-size levels down to one tile.

    The density is computed once at a size of at most 4096 px (its cells are far coarser)
    and each tile is cut from it, so a 100k^2 slide costs what its tiles do, not 30 GB.
    """
    import tifffile

    H, W = level0_size(source)  # the file's own level 0, under a rescaling too
    h, w = source.height, source.width
    small = (max(1, round(h * min(1.0, 4096 / max(h, w)))), max(1, round(w * min(1.0, 4096 / max(h, w)))))
    density = attention_density(out, index, h, w, small, strides)
    rgb = colormap(np.sqrt(density / density.max()) if density.max() > 0 else density)  # (h', w', 3)

    def tiles(level_h: int, level_w: int):
        for y in range(0, level_h, tile):
            for x in range(0, level_w, tile):
                ys = np.minimum(((np.arange(y, y + tile) + 0.5) * small[0] / level_h).astype(int), small[0] - 1)
                xs = np.minimum(((np.arange(x, x + tile) + 0.5) * small[1] / level_w).astype(int), small[1] - 1)
                yield rgb[ys][:, xs]

    sizes = [(H, W)]
    while max(sizes[-1]) > tile:
        sizes.append((max(1, sizes[-1][0] // 2), max(1, sizes[-1][1] // 2)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=H * W > 2**31) as tw:
        for i, (lh, lw) in enumerate(sizes):
            kwargs = {"subifds": len(sizes) - 1} if i == 0 else {"subfiletype": 1}
            tw.write(tiles(lh, lw), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="zlib", **kwargs)
    tmp.replace(path)
    return path
