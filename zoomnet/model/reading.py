"""Reading the regions a level needs through the images' sources: views and sub-tiles of
many boxes at once, the size of a view, and views whose outside repeats the image's edge."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from zoomnet.core.geometry import Box, edge_indices
from zoomnet.core.source import ImageSource, read_many


def read_boxes(
    sources: Sequence[ImageSource], keys: Sequence[tuple[int, Box]], out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """``(M, C, h, w)`` pixels of ``(image, box)`` keys, in key order, read image by image
    (one :func:`read_many` per image: one crop-and-resample pass where the source has it)."""
    rows: dict[int, list[int]] = {}
    for i, (b, _) in enumerate(keys):
        rows.setdefault(b, []).append(i)
    parts = [read_many(sources[b], [keys[i][1] for i in idx], out_size) for b, idx in rows.items()]
    stacked = torch.cat(parts) if len(parts) > 1 else parts[0]
    order = [i for idx in rows.values() for i in idx]
    if order == list(range(len(keys))):
        return stacked
    out = torch.empty_like(stacked)
    out[torch.tensor(order)] = stacked
    return out


def view_size(scale: float, height: int, width: int) -> tuple[int, int]:
    """Size of the view of a ``height x width`` region at ``scale`` (at least one pixel)."""
    return max(1, math.floor(scale * height)), max(1, math.floor(scale * width))


def repeat_edges(views: torch.Tensor, boxes: Sequence[Box], height: int, width: int) -> torch.Tensor:
    """``(M, C, h, w)`` views of ``boxes`` with their pixels outside the image replaced by
    the image's edge (:func:`edge_indices`); the views themselves where none sticks out."""
    if all(b.top >= 0 and b.left >= 0 and b.top + b.height <= height and b.left + b.width <= width for b in boxes):
        return views
    found = edge_indices(torch.tensor([tuple(b) for b in boxes], dtype=torch.long), views.shape[-2:], height, width)
    if found is None:
        return views
    rows, cols = (i.to(views.device) for i in found)
    m, c, h, w = views.shape
    views = views.gather(2, rows[:, None, :, None].expand(m, c, h, w))
    return views.gather(3, cols[:, None, None, :].expand(m, c, h, w))
