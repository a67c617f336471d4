"""Classifiers ``g``: aggregated feature ``(B, D)`` -> class logits ``(B, num_classes)``."""

from __future__ import annotations

import torch
from torch import nn

from zoomnet.nets.registry import register


class LinearClassifier(nn.Module):
    """A linear layer with a fixed input scale.

    Features are L2-normalised, so their weighted mean has norm at most one; ``scale``
    (``temperature``) lets a freshly initialised linear layer give logits of useful size.
    """

    def __init__(self, in_dim: int, num_classes: int, scale: float = 10.0):
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z * self.scale)


@register("classifier", "linear")
def linear(in_dim: int, num_classes: int, scale: float = 10.0) -> LinearClassifier:
    return LinearClassifier(in_dim, num_classes, scale)
