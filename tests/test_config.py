"""zoomnet.config: presets, overrides and the checks of every setting."""

from __future__ import annotations

import json

import pytest
from zoomnet import (
    LevelConfig,
    ModelConfig,
)
from zoomnet.cli import main

CONFIG_CASES = [
    ("unknown field", ["model.sampels=3"], "unknown field 'sampels'"),
    ("region smaller than its stride", ["model.levels.1.stride=[64,64]"], "smaller than its cell stride"),
    ("N <= 0", ["model.samples=0"], "samples"),
    ("scale outside (0, 1]", ["model.levels.0.scale=1.5"], "model.levels[1].scale=1.5: give a finite number > 0 and <= 1"),
    ("a truth value as a word", ["model.tissue_mask=maybe"], "model.tissue_mask='maybe': give true or false"),
    ("a count as a word", ["model.samples=ten"], "model.samples='ten': give a whole number >= 1"),
    ("one number for a region", ["model.levels.1.region=64"], "model.levels[2].region=64: give two whole numbers"),
    ("a scale as a word", ["model.levels.0.scale=abc"], "model.levels[1].scale='abc'"),
    ("a stride below a pixel", ["model.levels.1.stride=[0.01,0.01]"], "a stride below one pixel"),
    ("an attention net of depth 0", ["model.attention_depth=0"], "model.attention_depth=0"),
    ("smoothing as a word", ["model.smooth=abc"], "model.smooth='abc'"),
    ("unknown net", ["model.feature=vgg"], "unknown feature net"),
    ("bad net option", ["model.feature_kwargs={\"depth\": 3}"], "feature_kwargs"),
    ("not key=value", ["model.samples"], "expected key=value"),
    ("epochs not a number", ["train.epochs=abc"], "train.epochs='abc'"),
    ("zero epochs", ["train.epochs=0"], "train.epochs=0"),
    ("negative batch", ["train.batch_size=-1"], "train.batch_size=-1"),
    ("negative lr", ["train.lr=-1"], "train.lr=-1"),
    ("NaN lr", ["train.lr=NaN"], "train.lr=nan"),
    ("huge lr", ["train.lr=1e30"], "diverges"),
    ("contrastive start", ["train.contrastive_from=soon"], "contrastive_from"),
    ("zero pixel std", ["model.pixel_std=[64,0,64]"], "pixel_std"),
    ("fill as a word", ["data.fill=white"], "data.fill='white'"),
    ("negative mpp", ["data.target_mpp=-0.5"], "data.target_mpp"),
]


@pytest.mark.parametrize("case,sets,needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_catalogue(case, sets, needle, data, tmp_path, capsys):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--out", str(tmp_path / "r"), "--quiet", "--set", *sets]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r").exists()  # checked before anything is written


def test_a_repeated_set_keeps_every_value(data, tmp_path):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--out", str(tmp_path / "r"), "--quiet", "--set", "train.lr=0.002", "--set", "model.samples=3"]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "r/config.json").read_text())
    assert saved["train"]["lr"] == 0.002 and saved["model"]["samples"] == 3


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    """`make-data colon-cancer colon-cancer` then `train --config colon-cancer`: the preset."""
    from zoomnet.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "colon-cancer").mkdir()
    assert load_config("colon-cancer").model.levels[1].region == (27, 27)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"samples": 0}, "samples"),
        ({"levels": [LevelConfig(1.5, (8, 8)), LevelConfig(0.5, (4, 4))]}, "scale"),
        ({"levels": [LevelConfig(0.5, (8, 8), (16, 16)), LevelConfig(0.5, (4, 4))]}, "smaller than its cell stride"),
        ({"kind": "unet"}, "kind"),
    ],
)
def test_impossible_settings_are_refused(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**change)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                       | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3), max_leaves=6)
_FIELDS = {
    "model": ["kind", "levels", "samples", "train_samples", "feature", "feature_kwargs", "smooth", "pixel_mean",
              "chunk", "strip_rows", "tissue_mask", "attention_depth", "attention_head", "num_classes"],
    "train": ["epochs", "batch_size", "lr", "contrastive_from", "attention_from", "clip", "seed", "bf16"],
    "data": ["fill", "classes", "target_mpp", "max_pixels", "augment", "reference_class"],
}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([(g, f) for g, fs in _FIELDS.items() for f in fs]), max_size=4), st.data())
def test_fuzz_the_config_loader(fields, data):
    """Any value in any field gives a configuration or one UserError, never another exception."""
    from zoomnet.config import config_from_dict, defaults
    from zoomnet.errors import UserError

    config = defaults()
    for group, name in fields:
        config[group][name] = data.draw(_VALUES)
    try:
        built = config_from_dict(config, "fuzz.json")
    except UserError as exc:
        assert str(exc).startswith("fuzz.json: ") and "\n" not in str(exc)
    else:
        assert built.model.samples >= 1 and built.train.epochs >= 1
