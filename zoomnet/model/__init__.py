"""The model: the K-level hierarchy (:class:`ZoomIn`; K = 1 is ATS), the CNN baseline,
what a pass returns, and :func:`build_model`, which picks one from a :class:`ModelConfig`."""

from __future__ import annotations

from torch import nn

from zoomnet.config.model import LevelConfig, ModelConfig, with_legacy_fields
from zoomnet.model.cnn import CNNBaseline
from zoomnet.model.mil import AttentionMIL
from zoomnet.model.outputs import LevelTrace, Sample, ZoomInOutput
from zoomnet.model.reading import read_boxes, view_size
from zoomnet.model.zoomin import ZoomIn
from zoomnet.nets.layout import conv_layout

__all__ = [
    "AttentionMIL",
    "CNNBaseline",
    "LevelConfig",
    "LevelTrace",
    "ModelConfig",
    "Sample",
    "ZoomIn",
    "ZoomInOutput",
    "build_model",
    "conv_layout",
    "read_boxes",
    "view_size",
    "with_legacy_fields",
]


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config names: :class:`ZoomIn` for ``zoomin`` and ``ats``, the CNN or the
    attention-MIL baseline."""
    if config.kind == "mil":
        return AttentionMIL(config)
    return CNNBaseline(config) if config.kind == "cnn" else ZoomIn(config)
