"""The attention-MIL baseline of whole-slide classification (ABMIL, Ilse et al. 2018, as
CLAM and most pathology pipelines run it): every tissue tile of the image embedded by the
same feature net ``f``, pooled by gated attention, classified.

It reads every tile that holds tissue, at ``mil_scale``: the reference for how much of a
slide Zoom-In leaves unread. Tiles are ``mil_tile`` full-resolution pixels on a grid;
tissue is Otsu's threshold on the saturation of the level-1 view (``core.tissue``), a tile
kept where at least a tenth of its view pixels are tissue (all tiles where the view has no
contrast).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoomnet.config.model import ModelConfig
from zoomnet.core.geometry import Box
from zoomnet.core.source import ImageSource
from zoomnet.core.tissue import tissue_of_views, tissue_threshold
from zoomnet.model.chunks import in_chunks
from zoomnet.model.outputs import ZoomInOutput, in_eval_mode
from zoomnet.model.reading import read_boxes, view_size
from zoomnet.nets import build
from zoomnet.nets.layout import conv_layout, standardized

TISSUE_SHARE = 0.1  # a tile with at least this share of tissue pixels in the level-1 view is read


class AttentionMIL(nn.Module):
    """Gated-attention MIL over every tissue tile (``model.kind = "mil"``).

    >>> import numpy as np
    >>> from zoomnet.config import LevelConfig
    >>> from zoomnet.sources import ArraySource
    >>> cfg = ModelConfig(kind="mil", levels=[LevelConfig(0.125, (64, 64))], mil_tile=32, mil_scale=0.5)
    >>> out = AttentionMIL(cfg).predict([ArraySource(np.zeros((128, 128, 3), dtype=np.uint8))])
    >>> out.logits.shape
    torch.Size([1, 2])
    """

    def __init__(self, config: ModelConfig, hidden: int = 32):
        super().__init__()
        self.config = config
        c = len(config.pixel_mean)
        self.feature = build("feature", config.feature, in_channels=c, **config.feature_kwargs)
        d = self.feature.out_dim
        self.attention_v, self.attention_u = nn.Linear(d, hidden), nn.Linear(d, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.classifier = build("classifier", "linear", in_dim=d, num_classes=config.num_classes,
                                scale=config.classifier_scale)
        self.register_buffer("mean", torch.tensor(config.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.pixel_std).view(1, -1, 1, 1), persistent=False)

    def read_views(self, sources: Sequence[ImageSource]) -> torch.Tensor:
        """The level-1 views (tissue is found on them)."""
        h, w = sources[0].height, sources[0].width
        size = view_size(self.config.levels[0].scale, h, w)
        return torch.stack([s.read(Box(0, 0, h, w), size) for s in sources])

    def tiles(self, view: torch.Tensor, height: int, width: int) -> list[Box]:
        """The tiles of one image that hold tissue, from its ``(C, h, w)`` level-1 view."""
        t = self.config.mil_tile
        boxes = [Box(top, left, t, t) for top in range(0, height - t + 1, t) for left in range(0, width - t + 1, t)]
        boxes = boxes or [Box(0, 0, min(t, height), min(t, width))]
        threshold = tissue_threshold(view)
        if threshold is None:
            return boxes
        tissue = tissue_of_views(view[None], [threshold])[0].float()  # (h, w)
        fy, fx = tissue.shape[0] / height, tissue.shape[1] / width
        kept = []
        for b in boxes:
            y0, x0 = int(b.top * fy), int(b.left * fx)
            y1, x1 = max(y0 + 1, int((b.top + b.height) * fy)), max(x0 + 1, int((b.left + b.width) * fx))
            if float(tissue[y0:y1, x0:x1].mean()) >= TISSUE_SHARE:
                kept.append(b)
        return kept or boxes

    def forward(self, sources: Sequence[ImageSource], views: torch.Tensor | None = None, **_) -> ZoomInOutput:
        if views is None:
            views = self.read_views(sources)
        h, w = sources[0].height, sources[0].width
        size = view_size(self.config.mil_scale, self.config.mil_tile, self.config.mil_tile)
        logits, bags = [], []
        for b, source in enumerate(sources):
            keys = [(0, box) for box in self.tiles(views[b], h, w)]
            pixels = read_boxes([source], keys, size)  # (T, C, s, s)
            feats = in_chunks(self.feature, lambda x: self.feature(conv_layout(standardized(x, self.mean, self.std))),
                              pixels)  # (T, D)
            gate = torch.tanh(self.attention_v(feats)) * torch.sigmoid(self.attention_u(feats))  # (T, H)
            a = F.softmax(self.attention_w(gate).squeeze(1), dim=0)  # (T,)
            bags.append(a @ feats)  # (D,)
        z = torch.stack(bags)
        logits = self.classifier(z)
        return ZoomInOutput(logits=logits, z=z, levels=[], log_maps=[], parents=[])

    @torch.inference_mode()
    def predict(self, sources: Sequence[ImageSource], **kwargs) -> ZoomInOutput:
        """Inference without gradients (in inference mode, in eval mode)."""
        return in_eval_mode(self, sources, **kwargs)
