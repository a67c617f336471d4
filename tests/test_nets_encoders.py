"""zoomnet.nets.encoders: a user's encoder from a weight file, frozen, fed its own input size
and statistics; torchvision's nets by name (through a stand-in package with its API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from zoomnet import ModelConfig, ZoomIn
from zoomnet.cli import main
from zoomnet.nets.encoders import build_hub_net, load_weights, read_weights
from zoomnet.train import TrainConfig, make_optimizer

from helpers import _config

ENCODER_MODULE = '''
import torch
from torch import nn


class Encoder(nn.Module):
    """A small pretrained-style encoder: BatchNorm, a fixed input size, its own statistics."""

    input_size = (24, 24)
    pixel_mean = (100.0, 110.0, 120.0)
    pixel_std = (50.0, 55.0, 60.0)

    def __init__(self, in_channels=3, width=6):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.out_dim = width
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return torch.nn.functional.normalize(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)), dim=1)


def encoder(in_channels=3, width=6):
    return Encoder(in_channels, width)
'''


@pytest.fixture
def lab(tmp_path, monkeypatch) -> Path:
    """A user's module on the path, and a weight file of its net's random weights."""
    (tmp_path / "lab_encoders.py").write_text(ENCODER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("lab_encoders", None)
    import lab_encoders

    torch.manual_seed(7)
    net = lab_encoders.encoder()
    torch.nn.init.normal_(net.bn.running_mean)  # statistics a frozen net must keep
    save_file(net.state_dict(), str(tmp_path / "encoder.safetensors"))
    return tmp_path


def _frozen_config(lab: Path, **extra) -> ModelConfig:
    cfg = _config()
    cfg.feature, cfg.feature_frozen, cfg.feature_kwargs = "lab_encoders:encoder", True, {}
    cfg.feature_weights = str(lab / "encoder.safetensors")
    for k, v in extra.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def test_weight_files_load_in_either_format_and_nested(lab, tmp_path):
    import lab_encoders

    saved = read_weights(lab / "encoder.safetensors")
    nested = {"state_dict": {f"module.{k}": v for k, v in saved.items()}, "epoch": 3}
    torch.save(nested, tmp_path / "encoder.pt")
    for path in (lab / "encoder.safetensors", tmp_path / "encoder.pt"):
        net = lab_encoders.encoder()
        assert "tensors from" in load_weights(net, path)
        for k, v in net.state_dict().items():
            assert torch.equal(v, saved[k]), k


class NotWeights:  # a pickled object: loading it would run code
    pass


@pytest.mark.parametrize("case, expected", [
    ("missing file", "no such file"),
    ("damaged", "not a safetensors file"),
    ("code", "not a safetensors file or a weights-only checkpoint"),
    ("missing keys", "1 missing (conv.bias)"),
    ("unexpected keys", "1 unexpected (extra.weight)"),
    ("shape", "conv.weight [2, 3, 3, 3] in the file"),
    ("not a mapping", "no mapping of names to tensors"),
])
def test_bad_weight_files_are_refused_in_one_line_naming_the_keys(lab, tmp_path, case, expected):
    import lab_encoders

    good = read_weights(lab / "encoder.safetensors")
    path = tmp_path / "bad.pt"
    if case == "damaged":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    elif case == "code":
        torch.save({"net": NotWeights()}, path)
    elif case == "missing keys":
        torch.save({k: v for k, v in good.items() if k != "conv.bias"}, path)
    elif case == "unexpected keys":
        torch.save({**good, "extra.weight": torch.zeros(1)}, path)
    elif case == "shape":
        torch.save({**good, "conv.weight": torch.zeros(2, 3, 3, 3)}, path)
    elif case == "not a mapping":
        torch.save([torch.zeros(1)], path)
    if case == "missing file":
        path = tmp_path / "absent.safetensors"
    with pytest.raises(ValueError) as caught:
        load_weights(lab_encoders.encoder(), path)
    message = str(caught.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_a_frozen_encoder_gets_no_gradient_no_optimiser_state_and_keeps_its_statistics(lab):
    cfg = _frozen_config(lab)
    model = ZoomIn(cfg)
    load_weights(model.feature, cfg.feature_weights)
    before = {k: v.clone() for k, v in model.feature.state_dict().items()}
    optimizer = make_optimizer(model, TrainConfig())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.feature.parameters())
    assert any(id(p) in in_optimizer for p in model.classifier.parameters())
    model.train()
    assert not model.feature.training and model.attention.training
    from zoomnet.sources import ArraySource

    sources = [ArraySource((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    out = model(sources, generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
    optimizer.step()
    assert all(p.grad is None for p in model.feature.parameters())
    assert model.classifier.linear.weight.grad is not None
    for k, v in model.feature.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in a frozen encoder"
    # fed its declared input: resampled to 24 x 24 (the sub-tiles are 16 px)
    assert set(model.feature.seen) == {(24, 24)}


def test_the_encoders_statistics_and_size_normalise_its_input_only(lab):
    cfg = _frozen_config(lab, feature_size=(20, 20), feature_mean=(0.0, 0.0, 0.0), feature_std=(255.0,) * 3)
    model = ZoomIn(cfg).eval()
    seen = []
    model.feature.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    pixels = torch.full((1, 3, 16, 16), 255.0)
    model.encode(pixels)
    assert seen[0].shape[-2:] == (20, 20) and torch.allclose(seen[0], torch.ones(1, 3, 20, 20))
    # the attention nets keep the model's own statistics
    assert torch.allclose(model.normalize(pixels), (pixels - 127.5) / 64.0)


def test_an_encoder_from_a_weight_file_trains_frozen_and_predicts_identically_in_a_fresh_process(lab, data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--out", str(run),
            "--quiet", "--device", "cpu", "--epochs", "1", "--set", "model.feature=lab_encoders:encoder",
            "model.feature_kwargs={}", f"model.feature_weights={lab / 'encoder.safetensors'}", "model.feature_frozen=true"]
    assert main(args) == 0
    recorded = json.loads((run / "config.json").read_text())["model"]
    assert recorded["feature_size"] == [24, 24] and recorded["feature_mean"] == [100.0, 110.0, 120.0]
    from zoomnet.runs.loading import load_run

    model = load_run(run)[0]
    saved = read_weights(lab / "encoder.safetensors")
    for k, v in model.feature.state_dict().items():  # frozen: the checkpoint holds the file's weights
        assert torch.equal(v, saved[k]), k
    image = str(data / "set/images/tiny_00000.png")
    here = tmp_path / "here.csv"
    assert main(["predict", str(run), image, "--out", str(here), "--seed", "3", "--quiet"]) == 0
    (lab / "encoder.safetensors").unlink()  # prediction needs the run alone, not the file
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lab), os.environ.get("PYTHONPATH", "")])}
    fresh = tmp_path / "fresh.csv"
    done = subprocess.run([sys.executable, "-m", "zoomnet", "predict", str(run), image, "--out", str(fresh),
                           "--seed", "3", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    def probabilities(path: Path) -> list[str]:  # all but the time it took
        return [line.rsplit(",", 1)[0] for line in path.read_text().splitlines()]

    assert probabilities(fresh) == probabilities(here) and len(probabilities(here)) == 2


def test_a_bad_weight_file_stops_training_before_the_run_folder_is_touched(lab, data, tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    run = tmp_path / "run"
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--out",
                 str(run), "--quiet", "--device", "cpu", "--set", "model.feature=lab_encoders:encoder",
                 "model.feature_kwargs={}", f"model.feature_weights={tmp_path / 'wrong.pt'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "wrong.pt" in err and "missing" in err and len(err.splitlines()) == 1
    assert not (run / "config.json").exists()


STAND_IN = '''
"""A stand-in for torchvision's model API (list_models, get_model, get_model_weights)."""
from torch import nn


class _Preset:
    crop_size = [40]
    mean = [0.5, 0.4, 0.3]
    std = [0.2, 0.2, 0.2]


class _Weights:
    class DEFAULT:
        @staticmethod
        def transforms():
            return _Preset()


class Small(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.conv1(x)).flatten(1))


def list_models():
    return ["small"]


def get_model(name, weights=None, **kwargs):
    assert weights is None
    return Small(**kwargs)


def get_model_weights(name):
    return _Weights
'''


def test_torchvision_nets_by_name_lose_their_head_and_declare_their_input(tmp_path, monkeypatch):
    package = tmp_path / "torchvision"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("from torchvision import models\n")
    (package / "models" / "__init__.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        monkeypatch.delitem(sys.modules, name)
    net = build_hub_net("torchvision/small")
    assert net.out_dim == 5 and net.input_size == (40, 40) and net.head_keys == ("fc.",)
    assert net.pixel_mean == pytest.approx((127.5, 102.0, 76.5))
    assert net(torch.zeros(2, 3, 40, 40)).shape == (2, 5)
    # a file of the whole net (with its head) loads: the head's keys are dropped
    import torchvision

    whole = torchvision.models.get_model("small")
    torch.save(whole.state_dict(), tmp_path / "small.pt")
    assert "head fc. dropped" in load_weights(net, tmp_path / "small.pt")
    assert torch.equal(net.backbone.conv1.weight, whole.conv1.weight)
    with pytest.raises(ValueError, match="no architecture 'large'"):
        build_hub_net("torchvision/large")
    cfg = ModelConfig(feature="torchvision/small", levels=_config().levels)
    model = ZoomIn(cfg)
    assert model.feature_size == (40, 40) and model.feature_mean.flatten().tolist() == pytest.approx([127.5, 102.0, 76.5])


def test_a_hub_that_does_not_import_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ValueError, match=r"timm does not import .*install the timm release built for torch"):
        build_hub_net("timm/resnet18")


@pytest.mark.parametrize("setting, expected", [
    (["model.feature_mean=[1,2,3]"], "give both or neither"),
    (["model.feature_size=[0,4]"], "positive sizes"),
    (["model.feature_mean=[1,2]", "model.feature_std=[1,2]"], "one value per channel"),
    (["model.kind=cnn", "model.feature_frozen=true"], "the cnn baseline does not take them"),
    (["model.feature=torchvision"], "unknown feature net"),
])
def test_encoder_settings_are_checked(data, tmp_path, capsys, setting, expected):
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--out",
                 str(tmp_path / "run"), "--quiet", "--set", *setting])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
