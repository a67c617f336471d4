"""Shared fixtures: a tiny generated data set and a run trained on it (built once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from zoomnet.cli import main

TINY = {
    "model": {
        "kind": "zoomin",
        "levels": [
            {"scale": 0.125, "region": [64, 64], "stride": "tiled"},
            {"scale": 0.5, "region": [32, 32], "stride": [16, 16]},
        ],
        "samples": 4,
        "feature_kwargs": {"width": 8, "out_dim": 8, "stem_stride": 2},
    },
    "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "contrastive_from": 1, "instance_weight": 1.0,
              "distill_weight": 1.0},
}


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    assert main(["make-data", "tiny-objects", str(root / "set"), "--num", "20", "--size", "128"]) == 0
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


@pytest.fixture(scope="session")
def run(data) -> Path:
    out = data / "run"
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--val", str(data / "set/val.csv"), "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    return out


