"""zoomnet.bench: its FLOP and memory measures, and runs of the harness."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from zoomnet.bench import COLUMNS, MODELS, PeakTensorMemory
from zoomnet.cli import main
from zoomnet.core.geometry import (
    pool_to_grid,
)


def test_peak_memory_follows_allocations_and_frees():
    with PeakTensorMemory() as mem:
        a = torch.ones(1000)  # 4 kB
        b = a * 2  # 8 kB alive
        del a  # 4 kB
        c = torch.ones(3000)  # 16 kB alive: the peak
        del b, c
        d = torch.ones(10)
    assert mem.peak == 16000
    assert mem.current == 40  # only d is alive
    weights = torch.ones(10_000)
    with PeakTensorMemory() as mem:
        view = weights[:10] + 1  # a tensor from before the block is not counted; its result is
    assert mem.peak == 40 and view.numel() == 10


def test_bench_prints_one_csv_row_per_model(capsys):
    assert main(["bench", "colon-cancer", "--skip-training", "--repeats", "1"]) == 0
    text = "\n".join(ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#"))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["model"] for r in rows] == MODELS and list(rows[0]) == COLUMNS
    by = {r["model"]: r for r in rows}
    assert float(by["ats-fullres"]["peak_memory_mb"]) > float(by["ats"]["peak_memory_mb"])  # holds the image
    assert float(by["cnn"]["flops"]) > float(by["cnn-downsampled"]["flops"])
    assert by["cnn"]["attention_flops"] == "" and int(by["zoomin"]["attention_flops"]) > 0


def test_bench_names_its_settings_and_models(capsys):
    assert main(["bench", "colon"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting" in err and "colon-cancer" in err and "fmow" in err
    assert main(["bench", "colon-cancer", "--skip-training", "--models", "unet"]) == 2
    assert "bench --models: unknown model 'unet'" in capsys.readouterr().err


def test_every_preset_has_a_bench_setting_on_its_stand_in():
    from zoomnet.bench import SETTINGS, setting_config
    from zoomnet.bench.settings import SLIDE_PRESETS
    from zoomnet.config import available_presets

    assert {s.preset for s in SETTINGS.values()} | set(SLIDE_PRESETS) == set(available_presets())
    ats = setting_config("fmow", "ats")
    assert ats.model.kind == "ats" and ats.model.levels[0].scale == 0.5  # the preset's ats_scale
    assert setting_config("fmow", "cnn-downsampled").model.cnn_scale == 0.25


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_bench_trains_tests_and_measures_a_tiny_needles_set(tmp_path, capsys):
    args = ["bench", "needles", "--seeds", "2", "--num", "12", "--size", "256", "--epochs", "1", "--quiet",
            "--work", str(tmp_path), "--cost-images", "1", "--repeats", "1", "--csv", str(tmp_path / "out.csv")]
    assert main(args) == 0
    text = "\n".join(ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#"))
    rows = {r["model"]: r for r in csv.DictReader(io.StringIO(text))}
    assert list(rows) == MODELS
    for m in ("zoomin", "ats", "cnn-downsampled"):
        assert 0 <= float(rows[m]["accuracy"]) <= 1 and rows[m]["accuracy_std"] != ""
        assert float(rows[m]["train_images_per_s"]) > 0
    for m in ("zoomin", "ats"):
        assert 0 <= float(rows[m]["images_hit"]) <= 1
    assert rows["cnn"]["accuracy"] == ""  # full resolution: cost only
    assert (tmp_path / "out.csv").read_text().splitlines()[-5].startswith("zoomin,")
    # a second call reuses the trained runs: same accuracies
    assert main(args) == 0
    again = {r["model"]: r for r in csv.DictReader(io.StringIO(
        "\n".join(ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#"))))}
    assert [again[m]["accuracy"] for m in MODELS] == [rows[m]["accuracy"] for m in MODELS]


def test_pooling_and_running_sums_are_counted_as_additions():
    """The FLOP counter sees convolutions and matrix products; the bench's also counts one
    addition per element of the linear-time sums (cell pooling, the prior's running sums)."""
    from zoomnet.bench import flop_counter
    from zoomnet.core.geometry import pooling_plan
    from zoomnet.nets.attention import local_contrast

    rows, cols = pooling_plan((64, 48), (1024, 768), (64.0, 64.0))  # 4x4 pixels a cell
    with flop_counter() as fc:
        pool_to_grid(torch.zeros(2, 64, 48), rows, cols)
    assert fc.get_total_flops() == 2 * 64 * 48 + 2 * 16 * 48  # rows of cells, then columns
    m, c, h, w = 2, 3, 10, 12
    with flop_counter() as fc:
        local_contrast(torch.randn(m, c, h, w))
    # two running sums over the padded view (7 px more on each axis); the mean over channels
    # is not a sum the counter knows, and is cheap beside them
    assert fc.get_total_flops() == m * c * ((h + 7) * (w + 7) + (h + 7) * w)
