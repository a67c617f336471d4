"""The benchmark harness: its memory measure, and a tiny run of `zoomnet bench`."""

from __future__ import annotations

import csv
import io

import torch

from zoomnet.bench import COLUMNS, MODELS, PeakTensorMemory
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


def test_bench_without_skip_training_says_what_is_missing(capsys):
    assert main(["bench", "colon-cancer"]) == 2
    assert "--skip-training" in capsys.readouterr().err
