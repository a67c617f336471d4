"""Feature nets ``f``: a sub-tile ``(M, C, h, w)`` -> feature ``(M, D)``.

``lenet`` follows the authors' code for the colon set (conv5x5 3->36, pool, conv5x5 36->48,
pool, global pool, L2-normalise, 48-d). ``resnet`` is a small pre-activation ResNet
(He et al. 2016, "Identity mappings") with GroupNorm, so that a feature does not depend on
which other sub-tiles share its batch or chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoomnet.nets.registry import register


class LeNet(nn.Module):
    """LeNet-like feature net of the Zoom-In authors' code (48-d, L2-normalised)."""

    def __init__(
        self, in_channels: int = 3, width: int = 36, out_dim: int = 48, normalize: bool = True,
        stem_stride: int = 1, pool: str = "mean",
    ):
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"feature pool={pool!r}: use 'mean' or 'max'")
        self.pool = pool
        self.conv1 = nn.Conv2d(in_channels, width, 5, stride=stem_stride, padding=2)
        self.conv2 = nn.Conv2d(width, out_dim, 5, padding=2)
        self.out_dim = out_dim
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4:
            # channels-last on a CPU whatever the batch: the 5x5 convolutions go to oneDNN in
            # either layout, and the 2x2 max pooling after them is several times faster on
            # it, even for one small sub-tile at a time (how the colon preset's inference runs f)
            x = x.contiguous(memory_format=torch.channels_last)
        # conv, ReLU, 2x2 max pool twice, then a global pool. ReLU and max pooling commute, so
        # the ReLU runs after each pool, on a quarter of the values (in place: the pool's
        # backward needs its indices, not its output); with the global max, the second 2x2
        # pool is a max of maxes and is skipped, over the rows and columns it would cover.
        x = F.relu(F.max_pool2d(self.conv1(x), 2), inplace=True)  # (M, width, h/2, w/2)
        x = self.conv2(x)  # (M, D, h/2, w/2)
        if self.pool == "max":
            x = F.relu(x[:, :, : x.shape[2] // 2 * 2, : x.shape[3] // 2 * 2].amax(dim=(2, 3)))  # (M, D)
        else:
            x = F.relu(F.max_pool2d(x, 2), inplace=True).mean(dim=(2, 3))  # (M, D)
        return F.normalize(x, dim=1) if self.normalize else x


class PreActBlock(nn.Module):
    """GroupNorm-ReLU-conv twice, with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """A small pre-activation ResNet: stem, one block per stage, global average pool."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64), normalize: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(PreActBlock(c, w, stride=1 if i == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(min(8, c), c)
        self.out_dim = c
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (M, D, h/4, w/4)
        x = F.relu(self.norm(x)).mean(dim=(2, 3))  # (M, D)
        return F.normalize(x, dim=1) if self.normalize else x


@register("feature", "lenet")
def lenet(
    in_channels: int = 3, width: int = 36, out_dim: int = 48, normalize: bool = True,
    stem_stride: int = 1, pool: str = "mean",
) -> LeNet:
    """The authors' LeNet (global mean pooling). ``stem_stride=2`` quarters its cost on
    sub-tiles of 48 px and more; ``pool="max"`` finds a small pattern anywhere in the
    sub-tile, where a mean dilutes it."""
    return LeNet(in_channels, width, out_dim, normalize, stem_stride, pool)


@register("feature", "resnet")
def resnet(in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64), normalize: bool = True) -> PreActResNet:
    return PreActResNet(in_channels, tuple(widths), normalize)
