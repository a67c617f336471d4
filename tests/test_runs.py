"""Run folders across releases: a folder written by release 0.1.0 (checked in, tiny) still
predicts the probabilities it predicted then, evaluates, and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zoomnet.cli import main

LEGACY = Path(__file__).with_name("data") / "run-0.1.0"
# deterministic p(negative) of release 0.1.0 on the test images of `make-data tiny-objects
# --num 20 --size 128` (the `data` fixture), printed by `zoomnet predict --deterministic` then
LEGACY_P_NEGATIVE = {
    "images/tiny_00001.png": 0.5952922105789185,
    "images/tiny_00012.png": 0.4148551821708679,
    "images/tiny_00013.png": 0.5878325700759888,
    "images/tiny_00018.png": 0.4778814911842346,
}


def test_a_legacy_run_folder_predicts_what_it_predicted(data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    assert main(["predict", str(run), str(data / "set/test.csv"), "--deterministic", "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"path"')]
    assert {r["path"] for r in rows} == set(LEGACY_P_NEGATIVE)
    for r in rows:
        assert r["probabilities"]["negative"] == pytest.approx(LEGACY_P_NEGATIVE[r["path"]], abs=1e-5)


def test_a_legacy_run_folder_evaluates_and_resumes(data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    assert main(["evaluate", str(run), str(data / "set/test.csv"), "--deterministic", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["accuracy"] == 1.0 and metrics["images"] == 4
    config = Path(__file__).with_name("data") / "run-0.1.0.json"
    code = main(["train", "--config", str(config), "--train", str(data / "set/train.csv"), "--val",
                 str(data / "set/val.csv"), "--out", str(run), "--resume", "--epochs", "3", "--quiet",
                 "--device", "cpu"])
    assert code == 0
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]  # epochs 1-2 kept, 3 trained
    assert (LEGACY / "metrics.csv").read_text().strip().splitlines()[1] == rows[1]
