"""The demo end to end, at a tiny size (the full demo is `make demo`)."""

from __future__ import annotations

import pytest

from PIL import Image

from zoomnet.cli import main
from zoomnet.demo import run_demo


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_demo_runs_end_to_end(tmp_path):
    lines: list[str] = []
    metrics = run_demo(tmp_path, train_size=16, epochs=1, val_size=4, test_size=6, heatmaps=2,
                       log=lines.append, progress=False)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    acc = [ln for ln in lines if ln.startswith("accuracy: ")]
    assert len(acc) == 1 and float(acc[0].split()[1]) == round(metrics["accuracy"], 2)
    heat = [ln.split("heatmap: ")[1] for ln in lines if ln.startswith("heatmap: ")]
    assert len(heat) == 2
    for path in heat:
        assert Image.open(path).format == "PNG"
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.json").is_file()


def test_cli_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "zoomnet" in capsys.readouterr().out


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_cli_demo_runs_every_step(tmp_path, capsys):
    from zoomnet.cli import run_cli_demo

    assert run_cli_demo(tmp_path, num=20, epochs=1, heatmaps=2, extra=["--quiet"]) == 0
    out = capsys.readouterr()
    commands = [ln for ln in out.out.splitlines() if ln.startswith("$ zoomnet ")]
    assert [c.split()[2] for c in commands] == ["make-data", "train", "evaluate", "predict"]
    assert any(ln.startswith("accuracy: ") for ln in out.out.splitlines())
    assert run_cli_demo(tmp_path, num=20, epochs=1, heatmaps=2, extra=["--quiet"]) == 0  # `make demo` twice
    heat = [ln.split("heatmap: ")[1] for ln in out.err.splitlines() if ln.startswith("heatmap: ")]
    assert len(heat) == 2 and all(Image.open(p).format == "PNG" for p in heat)


def test_doctor_reports_what_a_bug_report_needs(capsys):
    from zoomnet.cli import main

    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    for key in ("zoomnet", "python", "torch", "device", "tifffile", "TIFF codecs", "OpenSlide", "presets"):
        assert any(line.startswith(key) for line in text.splitlines()), key
    assert "megapixel-mnist" in text and "tiny-objects" in text
