"""What the model looked at, as GeoJSON for QuPath and other slide viewers.

Every coordinate is in level-0 pixels of the original file, whatever the model saw: a
slide read at ``data.target_mpp`` is rescaled (``RescaledSource.native_box``, the mapping
its reads use), pyramid levels are already level-0 boxes, and boxes are clipped to the
image. QuPath imports the file with File > Import objects (or by drag and drop):

- each sampled sub-tile is a *detection* classified as the predicted class, with the
  measurements ``weight`` (its estimator weight), ``attention level 1`` and ``attention
  level 2`` (the attention probabilities of the cells on its path);
- each level-1 grid cell is a *detection* tile of class ``attention``, with the measurement
  ``attention`` (its probability), so Measure > Show measurement maps shows the heatmap;
- the collection's ``properties`` hold the image's prediction and class probabilities.
"""

from __future__ import annotations

from zoomnet.core.geometry import Box
from zoomnet.model import ZoomInOutput

MAX_GRID_FEATURES = 100_000  # a dense level-1 grid of a huge view is left out past this


def _colour(name: str) -> list[int]:
    h = sum(ord(c) * 31**i for i, c in enumerate(name)) % 360
    # a bright colour per class name, stable across runs
    import colorsys

    return [int(255 * v) for v in colorsys.hsv_to_rgb(h / 360, 0.8, 0.95)]


def level0_box(source, box: Box) -> Box:
    """``box`` of the model's frame in level-0 pixels of the file, clipped to the image."""
    inner = source.opened() if hasattr(source, "opened") else source
    native = inner.native_box(box) if hasattr(inner, "native_box") else Box(*box)
    base = getattr(inner, "inner", inner)
    top, left = max(0, native.top), max(0, native.left)
    bottom = min(base.height, native.top + native.height)
    right = min(base.width, native.left + native.width)
    return Box(top, left, max(0, bottom - top), max(0, right - left))


def _polygon(b: Box) -> dict:
    x0, y0, x1, y1 = b.left, b.top, b.left + b.width, b.top + b.height
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def geojson_of(
    out: ZoomInOutput, index: int, source, classes: list[str], probabilities: list[float],
    strides: list[tuple[float, float]], name: str = "",
) -> dict:
    """One image's sampled sub-tiles, level-1 attention grid and prediction as a GeoJSON
    FeatureCollection in level-0 pixel coordinates (see the module docstring).

    Args:
        out: the model's output for a batch.
        index: the image's place in the batch.
        source: its image source (the one the model read).
        classes: class names.
        probabilities: the image's class probabilities.
        strides: per level, the cell stride in the model's pixels.
        name: the image's path, recorded in the properties.
    """
    predicted = classes[max(range(len(classes)), key=lambda c: probabilities[c])]
    features = []
    traces = out.levels
    weight_of: dict[Box, float] = {}
    for s in traces[-1].samples[index]:
        weight_of[s.box] = weight_of.get(s.box, 0.0) + s.weight
    leaf_image = out.leaf_image.tolist() if out.leaf_image is not None else []
    for box, path, b in zip(out.leaf_boxes, out.leaf_paths, leaf_image):
        if b != index:
            continue
        measurements = {"weight": weight_of.get(box, 0.0)}
        for level, (_, parent, cell) in enumerate(path):
            measurements[f"attention level {level + 1}"] = float(traces[level].maps[index][parent][cell])
        features.append({
            "type": "Feature",
            "geometry": _polygon(level0_box(source, box)),
            "properties": {
                "objectType": "detection",
                "name": "sub-tile",
                "classification": {"name": predicted, "color": _colour(predicted)},
                "measurements": measurements,
            },
        })
    (whole, alpha), = traces[0].maps[index].items()
    g_h, g_w = traces[0].grid
    t_h, t_w = strides[0]
    if alpha.numel() <= MAX_GRID_FEATURES:
        values = alpha.tolist()
        for i in range(g_h):
            for j in range(g_w):
                cell = Box(round(i * t_h), round(j * t_w), round((i + 1) * t_h) - round(i * t_h),
                           round((j + 1) * t_w) - round(j * t_w))
                b0 = level0_box(source, cell)
                if b0.height == 0 or b0.width == 0:
                    continue
                features.append({
                    "type": "Feature",
                    "geometry": _polygon(b0),
                    "properties": {
                        "objectType": "detection", "name": "attention cell",
                        "classification": {"name": "attention", "color": [255, 200, 0]},
                        "measurements": {"attention": values[i * g_w + j]},
                    },
                })
    inner = source.opened() if hasattr(source, "opened") else source
    base = getattr(inner, "inner", inner)
    return {
        "type": "FeatureCollection",
        "properties": {
            "image": name, "prediction": predicted,
            "probabilities": dict(zip(classes, probabilities)),
            "level0_size": [base.height, base.width],
        },
        "features": features,
    }
