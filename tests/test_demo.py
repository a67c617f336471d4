"""The demo end to end, at a tiny size (the full demo is `make demo`)."""

from __future__ import annotations

from PIL import Image

from zoomnet.cli import main
from zoomnet.demo import run_demo


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
