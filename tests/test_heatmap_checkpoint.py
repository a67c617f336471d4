"""Heatmaps and checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from zoomnet import ArraySource, LevelConfig, ModelConfig, ZoomIn
from zoomnet.checkpoint import load_checkpoint, save_checkpoint
from zoomnet.heatmap import attention_density, colormap, render_batch


def small_model():
    torch.manual_seed(0)
    cfg = ModelConfig(levels=[LevelConfig(0.125, (32, 32)), LevelConfig(0.5, (8, 8), (4, 4))], samples=6)
    srcs = [ArraySource(np.random.default_rng(i).integers(0, 255, (128, 128, 3), dtype=np.uint8)) for i in range(2)]
    return ZoomIn(cfg), srcs


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


def test_checkpoint_round_trip(tmp_path):
    model, srcs = small_model()
    path = save_checkpoint(model, tmp_path / "run" / "model.safetensors", {"epoch": 3})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["state"] == {"epoch": 3}
    assert meta["model"]["levels"][1]["region"] == [8, 8]
    loaded, state = load_checkpoint(path)
    assert state == {"epoch": 3}
    a = model.predict(srcs, deterministic=True).logits
    b = loaded.predict(srcs, deterministic=True).logits
    assert torch.equal(a, b)
    assert not list((tmp_path / "run").glob("*.tmp"))  # no temporary files left behind


def test_a_checkpoint_from_before_the_contrast_prior_loads_without_one(tmp_path):
    import json

    from zoomnet.checkpoint import load_checkpoint, save_checkpoint
    from zoomnet.model import LevelConfig, ModelConfig, ZoomIn

    cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64)), LevelConfig(0.5, (16, 16), "dense")], attention_prior=0.0)
    model = ZoomIn(cfg)
    path = save_checkpoint(model, tmp_path / "old.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["model"]["attention_prior"]  # as written before the field existed
    path.with_suffix(".json").write_text(json.dumps(meta))
    loaded, _ = load_checkpoint(path)
    assert loaded.config.attention_prior == 0.0
    assert all(net.prior_gain is None for net in loaded.attention)


def test_a_users_attention_net_without_a_prior_still_builds():
    import torch
    from torch import nn

    from zoomnet.model import LevelConfig, ModelConfig, ZoomIn
    from zoomnet.nets.registry import register

    class Flat(nn.Module):
        def __init__(self, in_channels=3, width=8):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, 1, 1)

        def forward(self, x):
            return self.conv(x).squeeze(1)

    register("attention", "flat-test")(lambda in_channels=3, width=8: Flat(in_channels, width))
    cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64), attention="flat-test"), LevelConfig(0.5, (16, 16), "dense")])
    model = ZoomIn(cfg)
    assert model.attention[1].prior_gain is not None and not hasattr(model.attention[0], "prior_gain")
    out = model.predict([ArraySource(np.zeros((128, 128, 3), np.uint8))], generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (1, 2)
