"""Builders shared by several test modules: tiny images and files made by code, copies of the session's run."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from zoomnet import ArraySource, LevelConfig, ModelConfig, ZoomIn


def tissue_on_glass(rng: np.random.Generator, height: int, width: int, tissue: int) -> np.ndarray:
    """An RGB image: coloured texture (tissue) in its left ``tissue`` columns, white glass
    (245) on the right."""
    image = np.full((height, width, 3), 245, dtype=np.uint8)
    image[:, :tissue] = np.stack([rng.integers(150, 230, (height, tissue)), rng.integers(60, 120, (height, tissue)),
                                  rng.integers(120, 200, (height, tissue))], axis=-1)
    return image


def tiff_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


RNG = np.random.default_rng(0)


RGB = RNG.integers(0, 255, (128, 128, 3), dtype=np.uint8)


VALID_TIFF = tiff_bytes(RGB[:64, :64])


def tiled_jpeg_tiff() -> bytes:
    """A small JPEG-tiled pyramid, so that fuzzing reaches the native codecs too."""

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(RGB[:64, :64], tile=(16, 16), compression="jpeg", photometric="rgb", subifds=1)
        tw.write(RGB[:32:2, :32:2], tile=(16, 16), compression="jpeg", photometric="rgb", subfiletype=1)
    return buf.getvalue()


VALID_JPEG_TIFF = tiled_jpeg_tiff()


def _copy_run(run: Path, to: Path) -> Path:
    """A copy of the session's trained run that a test may change."""
    to.mkdir()
    for f in run.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def small_model():
    torch.manual_seed(0)
    cfg = ModelConfig(levels=[LevelConfig(0.125, (32, 32)), LevelConfig(0.5, (8, 8), (4, 4))], samples=6)
    srcs = [ArraySource(np.random.default_rng(i).integers(0, 255, (128, 128, 3), dtype=np.uint8)) for i in range(2)]
    return ZoomIn(cfg), srcs


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _config(size: int = 64) -> ModelConfig:
    return ModelConfig(
        levels=[LevelConfig(0.25, (size // 2, size // 2), "tiled"), LevelConfig(0.5, (24, 24), (8, 8))],
        num_classes=3, samples=8, train_samples=16, smooth=0.1,
        feature_kwargs={"width": 16, "out_dim": 16, "pool": "max"},
    )
