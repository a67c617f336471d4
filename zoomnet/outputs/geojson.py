"""What the model looked at, as GeoJSON for QuPath and other slide viewers.

Every coordinate is in level-0 pixels of the original file, whatever the model saw: a
slide read at ``data.target_mpp`` is rescaled (``zoomnet.sources.base.level0_box``, the
mapping its reads use), pyramid levels are already level-0 boxes, and boxes are clipped to the
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
from zoomnet.sources.base import level0_box, level0_size

MAX_GRID_FEATURES = 100_000  # a dense level-1 grid of a huge view is left out past this


def _colour(name: str) -> list[int]:
    h = sum(ord(c) * 31**i for i, c in enumerate(name)) % 360
    # a bright colour per class name, stable across runs
    import colorsys

    return [int(255 * v) for v in colorsys.hsv_to_rgb(h / 360, 0.8, 0.95)]


def _polygon(b: Box) -> dict:
    x0, y0, x1, y1 = b.left, b.top, b.left + b.width, b.top + b.height
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _detection(box: Box, name: str, cls: str, colour: list[int], measurements: dict) -> dict:
    return {
        "type": "Feature",
        "geometry": _polygon(box),
        "properties": {
            "objectType": "detection", "name": name,
            "classification": {"name": cls, "color": colour},
            "measurements": measurements,
        },
    }


def _sub_tiles(out: ZoomInOutput, index: int, source, predicted: str) -> list[dict]:
    """The image's distinct sampled sub-tiles, classified as the prediction, with their
    estimator weight and the attention of the cells on their path."""
    traces = out.levels
    weight_of: dict[Box, float] = {}
    for s in traces[-1].samples[index]:
        weight_of[s.box] = weight_of.get(s.box, 0.0) + s.weight
    leaf_image = out.leaf_image.tolist() if out.leaf_image is not None else []
    features = []
    for box, path, b in zip(out.leaf_boxes, out.leaf_paths, leaf_image):
        if b != index:
            continue
        measurements = {"weight": weight_of.get(box, 0.0)}
        for level, (_, parent, cell) in enumerate(path):
            measurements[f"attention level {level + 1}"] = float(traces[level].maps[index][parent][cell])
        features.append(_detection(level0_box(source, box), "sub-tile", predicted, _colour(predicted), measurements))
    return features


def _attention_cells(out: ZoomInOutput, index: int, source, stride: tuple[float, float]) -> list[dict]:
    """The level-1 grid cells with their attention (none past ``MAX_GRID_FEATURES`` cells)."""
    (alpha,) = out.levels[0].maps[index].values()
    g_h, g_w = out.levels[0].grid
    t_h, t_w = stride
    if alpha.numel() > MAX_GRID_FEATURES:
        return []
    values = alpha.tolist()
    features = []
    for i in range(g_h):
        for j in range(g_w):
            cell = Box(round(i * t_h), round(j * t_w), round((i + 1) * t_h) - round(i * t_h),
                       round((j + 1) * t_w) - round(j * t_w))
            b0 = level0_box(source, cell)
            if b0.height and b0.width:
                features.append(_detection(b0, "attention cell", "attention", [255, 200, 0],
                                           {"attention": values[i * g_w + j]}))
    return features


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
    features = _sub_tiles(out, index, source, predicted) + _attention_cells(out, index, source, strides[0])
    return {
        "type": "FeatureCollection",
        "properties": {
            "image": name, "prediction": predicted,
            "probabilities": dict(zip(classes, probabilities)),
            "level0_size": list(level0_size(source)),
        },
        "features": features,
    }
