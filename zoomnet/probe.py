"""What the feature net and classifier make of single sub-tiles: a probe that needs masks.

Training can be flat for two reasons: the attention never sends the draws to the objects,
or ``f`` sees them and cannot tell what they are. The heatmaps show the first; this shows
the second. For each image with a mask it cuts sub-tiles of the model's last-level size
centred near an object pixel (labelled with the image's class) and sub-tiles anywhere
that miss every object (row "off objects"), runs ``f`` and ``g`` on each sub-tile
alone, and counts the predicted classes.
"""

from __future__ import annotations

import numpy as np
import torch

from zoomnet.core.geometry import Box
from zoomnet.data.examples import Example

OFF = "off objects"


def _object_pixels(mask, limit: int = 1 << 20) -> tuple[np.ndarray, float, float]:
    """Object pixels of a mask read at most ``limit`` pixels large, and the factors that
    take their coordinates back to full resolution."""
    h, w = mask.height, mask.width
    step = max(1.0, (h * w / limit) ** 0.5)
    size = (max(1, int(h / step)), max(1, int(w / step)))
    small = mask.read(Box(0, 0, h, w), None if size == (h, w) else size)[0].numpy()
    return np.argwhere(small > 0), h / size[0], w / size[1]


def crops(example: Example, region: tuple[int, int], per_image: int, rng: np.random.Generator) -> list[tuple[Box, bool]]:
    """Up to ``per_image`` boxes on objects and as many that miss them (``(box, on_object)``);
    boxes lie inside the image."""
    src, mask = example.source, example.mask
    h, w = region
    if src.height < h or src.width < w:
        return []
    pixels, fy, fx = _object_pixels(mask)
    out: list[tuple[Box, bool]] = []
    for _ in range(per_image if len(pixels) else 0):
        y, x = pixels[rng.integers(len(pixels))]
        cy, cx = (y + 0.5) * fy + rng.integers(-h // 4, h // 4 + 1), (x + 0.5) * fx + rng.integers(-w // 4, w // 4 + 1)
        top = int(np.clip(cy - h // 2, 0, src.height - h))
        left = int(np.clip(cx - w // 2, 0, src.width - w))
        out.append((Box(top, left, h, w), True))
    tries = 0
    while sum(not on for _, on in out) < per_image and tries < 20 * per_image:
        tries += 1
        box = Box(int(rng.integers(0, src.height - h + 1)), int(rng.integers(0, src.width - w + 1)), h, w)
        if not mask.read(box)[0].gt(0).any():
            out.append((box, False))
    return out


@torch.no_grad()
def probe(model: torch.nn.Module, examples: list[Example], classes: list[str], per_image: int = 4,
          seed: int = 0, progress: bool = False) -> dict:
    """Counts of predicted classes for object sub-tiles (by their image's class) and for
    background sub-tiles; see the module.

    Returns ``{"rows": [true class..., "off objects"], "counts": (rows x classes) list,
    "object_accuracy": share of object sub-tiles called their image's class,
    "images": images probed}``.
    """
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    region = tuple(model.config.levels[-1].region)
    model = model.eval()
    rows = [*classes, OFF]
    counts = np.zeros((len(rows), len(classes)), dtype=int)
    probed = 0
    with_masks = [e for e in examples if e.mask is not None]
    for example in tqdm(with_masks, desc="probe", unit="image", disable=not progress):
        boxes = crops(example, region, per_image, rng)
        if not boxes:
            continue
        probed += 1
        pixels = torch.stack([example.source.read(box) for box, _ in boxes])  # (M, C, h, w)
        logits = model.classifier(model.encode(pixels))
        for (_, on_object), predicted in zip(boxes, logits.argmax(1).tolist()):
            counts[example.label if on_object else len(classes), predicted] += 1
    objects = counts[: len(classes)]
    total = int(objects.sum())
    return {"rows": rows, "classes": list(classes), "counts": counts.tolist(), "images": probed,
            "object_accuracy": float(np.trace(objects) / total) if total else float("nan")}
