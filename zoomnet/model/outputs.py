"""What a forward pass returns: logits, the aggregate, and where the model looked.

Shapes: B images, L leaves (distinct sub-tiles), G cells of a grid, M parents, D features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoomnet.core.geometry import Box


@dataclass
class Sample:
    """One drawn region: its box, how often it was drawn, and its (detached) path weight
    (a number, or ``(HostValues, index)``: read from the device when first asked for)."""

    box: Box
    count: int
    _weight: float | tuple
    cell: int

    @property
    def weight(self) -> float:
        if isinstance(self._weight, tuple):
            values, index = self._weight
            self._weight = float(values[index])
        return self._weight


@dataclass
class LevelTrace:
    """What one level looked at, per image.

    Attributes:
        maps: per image, ``{parent box: (G,) probabilities}`` (level 1: the whole image).
        grid: ``(g_h, g_w)`` of this level's maps (level 1: of the last image's size).
        samples: per image, the regions drawn at this level.
    """

    maps: list[dict[Box, torch.Tensor]]
    grid: tuple[int, int]
    samples: list[list[Sample]]


@dataclass
class ZoomInOutput:
    """Logits and what the model looked at.

    Attributes:
        logits: ``(B, num_classes)``.
        z: ``(B, D)`` aggregated features.
        levels: one :class:`LevelTrace` per level.
        log_maps: per level, per image, the ``(M, G)`` log-probability maps (with gradient;
            used by the entropy regularizer and mask supervision).
        parents: per level, per image, the parent boxes of those maps.
        leaf_features: ``(L, D)`` features of the distinct sub-tiles (training only).
        leaf_image: ``(L,)`` image index of each leaf.
        leaf_boxes: the leaves' boxes.
        leaf_paths: per leaf, ``(image, parent box, cell)`` at every level.
        cell_logits: per level, ``{(image, parent box): (G,) raw cell logits}`` of the
            attention nets' learnt part, without the contrast prior (with gradient).
        contrastive_logits: ``(B, num_classes)`` from the complementary sample, if asked.
    """

    logits: torch.Tensor
    z: torch.Tensor
    levels: list[LevelTrace]
    log_maps: list[list[torch.Tensor]]
    parents: list[list[list[Box]]]
    leaf_features: torch.Tensor | None = None
    leaf_image: torch.Tensor | None = None
    leaf_boxes: list[Box] = field(default_factory=list)
    leaf_paths: list[tuple[tuple[int, Box, int], ...]] = field(default_factory=list)
    cell_logits: list[dict[tuple[int, Box], torch.Tensor]] = field(default_factory=list)
    contrastive_logits: torch.Tensor | None = None


def in_eval_mode(model: torch.nn.Module, *args, **kwargs):
    """``model(*args, **kwargs)`` with every module in eval mode, each put back as it was."""
    if not any(m.training for m in model.modules()):  # already in eval mode: nothing to switch
        return model(*args, **kwargs)
    was = model.training
    model.eval()
    try:
        return model(*args, **kwargs)
    finally:
        model.train(was)
