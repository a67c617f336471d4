"""An example is an image source, a class index and, optionally, a mask source."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoomnet.core.geometry import Box
from zoomnet.core.source import ImageSource


@dataclass
class Example:
    """One labelled image.

    Attributes:
        source: the image, read lazily.
        label: class index.
        mask: object mask (values > 0 on objects), same size as the image, or None.
        name: a name for reports (file path or generated id).
    """

    source: ImageSource
    label: int
    mask: ImageSource | None = None
    name: str = ""
    _objects: bool | None = field(default=None, repr=False, compare=False)

    def has_objects(self) -> bool:
        """Whether the mask marks any object (read once, then remembered)."""
        if self._objects is None:
            m = self.mask
            if m is not None and hasattr(m, "any_object"):  # a mask file: at its stored size, band by band
                self._objects = m.any_object()
            else:
                self._objects = m is not None and float(m.read(Box(0, 0, m.height, m.width)).max()) > 0
        return self._objects


def batches_by_size(
    examples: list[Example], batch_size: int, shuffle: bool, generator: torch.Generator | None = None
) -> list[list[int]]:
    """Index batches of same-sized images (a batch shares one level-1 grid).

    >>> from zoomnet.sources import ArraySource
    >>> import numpy as np
    >>> ex = [Example(ArraySource(np.zeros((s, s), np.uint8)), 0) for s in (8, 8, 16, 8)]
    >>> batches_by_size(ex, 2, shuffle=False)
    [[0, 1], [3], [2]]
    """
    order = torch.randperm(len(examples), generator=generator).tolist() if shuffle else list(range(len(examples)))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in order:
        groups.setdefault((examples[i].source.height, examples[i].source.width), []).append(i)
    batches = [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches
