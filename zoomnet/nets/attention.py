"""Attention nets ``a_l``: fully convolutional, one logit per view pixel.

The authors' net (Kong & Henao, code for the colon set): three 3x3 convolutions with 8
channels and ReLU, then a 1x1 convolution to one channel. Its receptive field is 7 pixels
(a halo of 3 on each side), which strip-wise evaluation of large views relies on.
"""

from __future__ import annotations

import torch
from torch import nn

from zoomnet.nets.registry import register


class ConvAttention(nn.Module):
    """Three ``3x3`` convs (``width`` channels, ReLU) and a ``1x1`` conv to one logit.

    Args:
        in_channels: image channels.
        width: channels of the hidden convolutions (8 in the paper).
        depth: number of ``3x3`` convolutions (3 in the paper).
    """

    def __init__(self, in_channels: int = 3, width: int = 8, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True)]
            c = width
        layers.append(nn.Conv2d(c, 1, 1))
        self.net = nn.Sequential(*layers)
        self.halo = depth  # receptive-field radius in view pixels

    def forward(self, view: torch.Tensor) -> torch.Tensor:
        """``(M, C, h, w)`` normalised view -> ``(M, h, w)`` logits."""
        return self.net(view).squeeze(1)


@register("attention", "conv")
def conv_attention(in_channels: int = 3, width: int = 8, depth: int = 3) -> ConvAttention:
    return ConvAttention(in_channels, width, depth)
