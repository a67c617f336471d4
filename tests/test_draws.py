"""zoomnet.draws: the training N chosen from the gradient's noise over the draws."""

from __future__ import annotations

import json

import numpy as np
import torch
from zoomnet import ArraySource, LevelConfig, ModelConfig, ZoomIn
from zoomnet.cli import main
from zoomnet.data.examples import Example
from zoomnet.draws import choose_train_samples, gradient_rse
from zoomnet.train import TrainConfig


def _images(count: int = 4) -> list[Example]:
    """Noise images with a bright square in half of them (label 1)."""
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        img = rng.integers(0, 80, (128, 128, 3), dtype=np.uint8)
        if i % 2:
            top, left = rng.integers(0, 112, 2)
            img[top:top + 12, left:left + 12] = 255
        out.append(Example(ArraySource(img), i % 2, None, f"img{i}"))
    return out


def _model() -> ZoomIn:
    torch.manual_seed(0)
    return ZoomIn(ModelConfig(levels=[LevelConfig(0.125, (32, 32)), LevelConfig(0.5, (8, 8), (4, 4))], samples=4,
                              train_samples="auto", feature_kwargs={"width": 8, "out_dim": 8}))


def test_the_gradients_noise_over_the_draws_falls_as_one_over_root_n():
    model, cfg = _model(), TrainConfig(batch_size=2)
    batches = [_images()[:2], _images()[2:]]
    small, large = (gradient_rse(model, batches, cfg, n, draws=6) for n in (4, 64))
    # 16x the draws: about a quarter of the noise (a half would be far off 1/sqrt(N))
    assert 0.1 < large / small < 0.45, (small, large)


def test_the_choice_is_the_smallest_n_within_the_tolerance_and_leaves_the_model_as_it_was():
    model, examples = _model(), _images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    rng = torch.get_rng_state()
    measured = choose_train_samples(model, examples, TrainConfig(batch_size=2, samples_tolerance=1e-9),
                                    candidates=(4, 16, 64)).measured
    assert list(measured) == [4, 16, 64]  # nothing reaches a tolerance of 1e-9: every N tried
    middle = (measured[16] + measured[64]) / 2 if measured[64] < measured[16] else measured[16]
    choice = choose_train_samples(model, examples, TrainConfig(batch_size=2, samples_tolerance=middle),
                                  candidates=(4, 16, 64))
    assert choice.samples == min(n for n, v in choice.measured.items() if v <= middle)
    assert all(v > middle for n, v in choice.measured.items() if n < choice.samples)
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "training draws: N = " in choice.describe()


def test_train_samples_auto_is_chosen_recorded_and_resumed(data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--out", str(run),
            "--device", "cpu", "--quiet", "--set", "model.train_samples=auto", "train.samples_tolerance=0.3"]
    assert main(args) == 0
    said = capsys.readouterr().out
    recorded = json.loads((run / "config.json").read_text())["model"]["train_samples"]
    assert isinstance(recorded, int) and f"training draws: N = {recorded} " in said
    assert main([*args, "--resume", "--epochs", "2"]) == 0  # the same "auto" resumes with the number chosen
    assert json.loads((run / "config.json").read_text())["model"]["train_samples"] == recorded
