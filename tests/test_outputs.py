"""zoomnet.outputs: heatmaps and their colour map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from zoomnet.outputs import attention_density, colormap, render_batch

from helpers import small_model


def test_density_conserves_attention_mass():
    model, srcs = small_model()
    out = model.predict(srcs, generator=torch.Generator().manual_seed(0))
    strides = [lv.cell_stride() for lv in model.config.levels]
    density = attention_density(out, 0, 128, 128, (128, 128), strides)
    assert density.sum() == pytest.approx(1.0, abs=1e-6)
    assert (density >= 0).all()


def test_heatmap_png_is_written(tmp_path):
    model, srcs = small_model()
    out = model.predict(srcs, deterministic=True)
    paths = render_batch(model, srcs, out, [tmp_path / "a.png", tmp_path / "b.png"], ["a", "b"])
    for p in paths:
        img = Image.open(p)
        assert img.format == "PNG" and img.width > 128 and img.height >= 128
        assert np.asarray(img).std() > 0


def test_colormap_is_ordered_dark_to_bright():
    c = colormap(np.linspace(0, 1, 11)).astype(float).sum(axis=1)
    assert c[0] < c[5] < c[10]
