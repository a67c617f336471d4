"""zoomnet.nets: attention nets (the authors' net, the contrast prior), feature nets, nets of a user's module, the memory layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from zoomnet import (
    ArraySource,
    LevelConfig,
    ModelConfig,
    ZoomIn,
)
from zoomnet.data.generators.tiny_objects import make_shapes

from helpers import _config

NET_MODULE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, in_channels=3, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.out_dim = width

    def forward(self, x):
        return torch.nn.functional.normalize(self.conv(x).amax(dim=(2, 3)), dim=1)


def tiny_net(in_channels=3, width=4):
    return Tiny(in_channels, width)
'''


@pytest.mark.slow  # a training, then a prediction in a fresh process
def test_a_feature_net_from_a_users_module_trains_and_predicts_in_a_fresh_process(data, tmp_path):
    (tmp_path / "lab_nets.py").write_text(NET_MODULE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = tmp_path / "run"
    train = [sys.executable, "-m", "zoomnet", "train", "--config", str(data / "tiny.json"), "--train",
             str(data / "set/train.csv"), "--out", str(run), "--quiet", "--device", "cpu",
             "--set", "model.feature=lab_nets:tiny_net", 'model.feature_kwargs={"width": 6}']
    done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "config.json").read_text())["model"]["feature"] == "lab_nets:tiny_net"
    image = str(data / "set/images/tiny_00000.png")
    done = subprocess.run([sys.executable, "-m", "zoomnet", "predict", str(run), image], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["path"] == image
    # without the module on the path: one line that says how to fix it
    env.pop("PYTHONPATH")
    done = subprocess.run([sys.executable, "-m", "zoomnet", "predict", str(run), image], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path.parent)
    assert done.returncode == 2 and "lab_nets:tiny_net" in done.stderr and "PYTHONPATH" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_users_attention_net_without_a_prior_still_builds(monkeypatch):
    import torch
    from torch import nn
    from zoomnet.model import ZoomIn
    from zoomnet.nets import registry
    from zoomnet.nets.registry import available, register

    # a registry of this test's own: the net registered here must not outlive it
    monkeypatch.setattr(registry, "_BUILDERS", {kind: dict(b) for kind, b in registry._BUILDERS.items()})

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
    monkeypatch.undo()
    assert "flat-test" not in available("attention")


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("size", [27, 32])
def test_lenet_gives_the_values_and_gradients_of_conv_relu_pool_order(pool, size):
    """LeNet runs each ReLU after its pool and skips the second pool before a global max;
    the textbook order (conv, ReLU, pool, twice, then the global pool) gives the same
    features and gradients, odd sizes (a row the pools drop) included."""
    import torch.nn.functional as F
    from zoomnet.nets.features import LeNet

    torch.manual_seed(0)
    net = LeNet(3, 6, 8, True, 1, pool).double()
    x = torch.randn(5, 3, size, size, dtype=torch.float64)

    def textbook(x):
        y = F.max_pool2d(F.relu(net.conv1(x)), 2)
        y = F.max_pool2d(F.relu(net.conv2(y)), 2)
        return F.normalize(y.mean(dim=(2, 3)) if pool == "mean" else y.amax(dim=(2, 3)), dim=1)

    a, b = net(x), textbook(x)
    ga = torch.autograd.grad((a * a.detach().roll(1, 1)).sum(), list(net.parameters()))
    gb = torch.autograd.grad((b * b.detach().roll(1, 1)).sum(), list(net.parameters()))
    assert torch.allclose(a, b, atol=1e-12)
    assert all(torch.allclose(u, v, atol=1e-10) for u, v in zip(ga, gb))


def test_conv_layout_is_channels_last_on_cpu_for_large_inputs_only():
    from zoomnet.model import conv_layout

    big, small = torch.randn(8, 3, 64, 64), torch.randn(1, 3, 50, 50)
    assert conv_layout(big).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv_layout(big), big)
    assert conv_layout(small).is_contiguous() and conv_layout(torch.randn(4, 5)).is_contiguous()


def test_contrast_prior_draws_untrained_attention_to_objects():
    """Before any training the prior alone multiplies how often sub-tiles hit the shapes
    (fixed seeds; 8 images x 16 draws; measured 2.5x and more)."""
    from zoomnet.metrics import object_hits

    batch = make_shapes(8, classes=3, size=128, object_size=(10, 12), seed=3)
    rates = {}
    for prior in (0.0, 5.0):
        torch.manual_seed(0)
        cfg = _config(128)
        cfg.attention_prior = prior
        model = ZoomIn(cfg)
        out = model.predict([e.source for e in batch], samples=16, generator=torch.Generator().manual_seed(0))
        hit, tiles, *_ = object_hits(out, batch)
        rates[prior] = hit / tiles
    assert rates[5.0] > 2 * rates[0.0], rates


@pytest.mark.parametrize("shape", [(4, 3, 40, 33), (2, 1, 5, 9), (1, 3, 1, 1), (3, 3, 7, 2)])
def test_local_contrast_matches_the_mean_of_pixels_inside_each_neighbourhood(shape):
    """The fast neighbourhood mean (running sums along each axis divided by the pixels
    inside) is the 7x7 average pool that leaves the padding out, at the border and on tiny
    views."""
    from zoomnet.nets.attention import local_contrast

    view = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2
    mean = torch.nn.functional.avg_pool2d(view, 7, stride=1, padding=3, count_include_pad=False)
    expected = (view - mean).abs().mean(dim=1).clamp(max=3.0)
    got = local_contrast(view)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
