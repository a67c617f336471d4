"""The benchmark harness: its memory measure, and a tiny run of `zoomnet bench`."""

from __future__ import annotations

import pytest

import csv
import io

import torch

import math

import numpy as np

from zoomnet.bench import COLUMNS, MODELS, PeakTensorMemory
from zoomnet.metrics import leaf_probabilities, spearman
from zoomnet.sources.held import NumpySource
from zoomnet.core.geometry import Box
from zoomnet.cli import main


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


def test_bench_colon_has_nothing_to_train_on(capsys):
    assert main(["bench", "colon-cancer"]) == 2
    assert "--skip-training" in capsys.readouterr().err


def test_spearman_ranks_ties_by_their_average():
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 -> Pearson of the ranks
    x, y = [0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    assert math.isclose(spearman(x, y), np.corrcoef(rx, ry)[0, 1])
    assert math.isclose(spearman(np.exp(y), y), 1.0)  # monotone: 1
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_pyramid_reads_equal_resampling_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    plain, pyramid = NumpySource(image), NumpySource(image, scales=(0.25, 0.5))
    for box, size in [(Box(0, 0, 64, 96), (16, 24)), (Box(32, 32, 32, 32), (16, 16)), (Box(-8, -8, 16, 16), None)]:
        assert torch.equal(plain.read(box, size), pyramid.read(box, size))


def test_leaf_probabilities_multiply_along_the_path():
    from zoomnet.model import LevelConfig, ModelConfig, ZoomIn
    from zoomnet.sources import ArraySource

    torch.manual_seed(0)
    cfg = ModelConfig(levels=[LevelConfig(0.25, (16, 16), "tiled"), LevelConfig(0.5, (4, 4), "tiled")], samples=6)
    model = ZoomIn(cfg)
    src = ArraySource(torch.rand(3, 32, 32) * 255)
    out = model.predict([src], generator=torch.Generator().manual_seed(0))
    probs = leaf_probabilities(out)
    assert len(probs) == len(out.leaf_boxes) > 0
    for path, p in zip(out.leaf_paths, probs):
        (b, box1, c1), (_, box2, c2) = path
        alpha = out.log_maps[0][b][out.parents[0][b].index(box1)].exp().flatten()[c1]
        beta = out.log_maps[1][b][out.parents[1][b].index(box2)].exp().flatten()[c2]
        assert math.isclose(p, float(alpha * beta), rel_tol=1e-5)


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
