"""The CNN baseline of the paper's Table 1: a plain CNN on the whole (optionally
downsampled) image."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from zoomnet.config.model import ModelConfig
from zoomnet.core.geometry import Box
from zoomnet.core.source import ImageSource
from zoomnet.model.outputs import ZoomInOutput, in_eval_mode
from zoomnet.model.reading import view_size
from zoomnet.nets.features import PreActBlock
from zoomnet.nets.layout import conv_layout, standardized


class CNNBaseline(nn.Module):
    """A plain CNN on the whole image (optionally downsampled), global max pooling, linear.

    The reference the paper compares with (its "ResNet with 8 convolutional layers and 32
    channels"): a stride-2 stem and three pre-activation blocks of 32 channels (seven 3x3
    and two 1x1 convolutions). It reads every pixel of the (scaled) image.
    """

    def __init__(self, config: ModelConfig, width: int = 32):
        super().__init__()
        self.config = config
        c = len(config.pixel_mean)
        self.body = nn.Sequential(
            nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False),
            PreActBlock(width, width, 1), PreActBlock(width, width, 2), PreActBlock(width, width, 2),
            nn.GroupNorm(8, width), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(width, config.num_classes)
        self.register_buffer("mean", torch.tensor(config.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.pixel_std).view(1, -1, 1, 1), persistent=False)

    def read_views(self, sources: Sequence[ImageSource]) -> torch.Tensor:
        h, w = sources[0].height, sources[0].width
        size = view_size(self.config.cnn_scale, h, w)
        return torch.stack([s.read(Box(0, 0, h, w), None if size == (h, w) else size) for s in sources])

    def forward(self, sources: Sequence[ImageSource], views: torch.Tensor | None = None, **_) -> ZoomInOutput:
        if views is None:
            views = self.read_views(sources)
        x = conv_layout(standardized(views, self.mean, self.std))  # (B, C, h, w)
        feats = self.body(x).amax(dim=(2, 3))  # (B, width): global max pooling
        return ZoomInOutput(logits=self.head(feats), z=feats, levels=[], log_maps=[], parents=[])

    @torch.inference_mode()
    def predict(self, sources: Sequence[ImageSource], **kwargs) -> ZoomInOutput:
        """Inference without gradients (in inference mode, in eval mode)."""
        return in_eval_mode(self, sources, **kwargs)
