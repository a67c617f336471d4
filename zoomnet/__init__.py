"""zoomnet: classify very large images by zooming into where attention points.

Implements the Zoom-In network (Kong & Henao, CVPR 2022) and one-stage attention sampling
(ATS, Katharopoulos & Fleuret 2019) with an exactly unbiased estimator.
"""

from zoomnet.model import CNNBaseline, LevelConfig, ModelConfig, ZoomIn, ZoomInOutput, build_model
from zoomnet.sources import ArraySource, CountingSource, ImageSource

__version__ = "0.1.0"

__all__ = [
    "ArraySource",
    "CNNBaseline",
    "CountingSource",
    "ImageSource",
    "LevelConfig",
    "ModelConfig",
    "ZoomIn",
    "ZoomInOutput",
    "build_model",
]
