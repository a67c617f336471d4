"""zoomnet.demo: the demo through the command line."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from zoomnet.demo import run_demo


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_cli_demo_runs_every_step(tmp_path, capsys):
    assert run_demo(tmp_path, num=20, epochs=1, heatmaps=2, extra=["--quiet"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    commands = [ln for ln in lines if ln.startswith("$ zoomnet ")]
    assert [c.split()[2] for c in commands] == ["make-data", "train", "evaluate", "predict"]
    # evaluate's line and its JSON agree, over every test image of the demo's set
    test_images = len((tmp_path / "data/test.csv").read_text().strip().splitlines()) - 1
    evaluated = json.loads(next(ln for ln in lines if ln.startswith('{"accuracy"')))
    assert evaluated["images"] == test_images == 4
    assert f"accuracy: {evaluated['accuracy']:.4f}" in lines
    predicted = [json.loads(ln) for ln in lines if ln.startswith('{"path"')]
    assert len(predicted) == 2 and all(p["label"] in ("negative", "positive") for p in predicted)
    assert run_demo(tmp_path, num=20, epochs=1, heatmaps=2, extra=["--quiet"]) == 0  # `make demo` twice
    heat = [ln.split("heatmap: ")[1] for ln in out.err.splitlines() if ln.startswith("heatmap: ")]
    assert len(heat) == 2 and all(Image.open(p).format == "PNG" for p in heat)
