"""zoomnet.cli: every command end to end through main(argv), and what bad input gets on the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from zoomnet.cli import main
from zoomnet.errors import UserError


def test_evaluate_ends_with_json(data, run, capsys):
    assert main(["evaluate", str(run), str(data / "set/test.csv"), "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "auc" in metrics and "confusion" in metrics


def test_predict_json_heatmaps_geojson_and_cohort_csv(data, run, tmp_path, capsys):
    image = str(data / "set/images/tiny_00000.png")
    code = main(["predict", str(run), image, "--heatmaps", str(tmp_path / "heat"),
                 "--geojson", str(tmp_path / "geo"), "--deterministic"])
    assert code == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert {"path", "label", "probabilities", "seconds", "pixels_read", "bytes_read"} <= set(line)
    assert line["path"] == image and abs(sum(line["probabilities"].values()) - 1) < 1e-5
    assert (tmp_path / "heat" / "tiny_00000.png").is_file()
    assert "heatmap: " in captured.err
    geo = json.loads((tmp_path / "geo" / "tiny_00000.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    assert geo["features"][0]["geometry"]["type"] == "Polygon"
    out_csv = tmp_path / "pred.csv"
    assert main(["predict", str(run), "--manifest", str(data / "set/test.csv"), "--out", str(out_csv)]) == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 4 and "p_positive" in rows[0] and rows[0]["true_label"] in ("negative", "positive")


def test_predict_is_reproducible(data, run, capsys):
    image = str(data / "set/images/tiny_00001.png")
    outs = []
    seeds = [str(s) for s in range(8)]
    for args in (["--deterministic"], ["--deterministic"], ["--seed", "3"], ["--seed", "3"],
                 *(["--seed", s] for s in seeds)):
        assert main(["predict", str(run), image, *args]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip())["probabilities"])
    assert outs[0] == outs[1] and outs[2] == outs[3]  # the same seed, the same draws
    # another seed draws other sub-tiles: some of eight seeds must give another probability
    assert any(o != outs[2] for o in outs[4:]), outs


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def bad_inputs(data: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    good = str(data / "set/train.csv")
    img = str(data / "set/images/tiny_00000.png")
    cfg = str(data / "tiny.json")
    return {
        "missing csv": (["train", "--config", cfg, "--train", "nope.csv", "--out", str(tmp / "r")], "nope.csv"),
        "misnamed column": (["train", "--config", cfg, "--train",
                             str(write_csv(tmp / "cols.csv", ["file", "label"], [[img, "positive"]])),
                             "--out", str(tmp / "r")], "missing column 'path'"),
        "empty csv": (["train", "--config", cfg, "--train", str(write_csv(tmp / "empty.csv", ["path", "label"], [])),
                       "--out", str(tmp / "r")], "no rows"),
        "unknown val label": (["train", "--config", cfg, "--train", good, "--val",
                               str(write_csv(tmp / "val.csv", ["path", "label"], [[img, "maybe"]])),
                               "--out", str(tmp / "r")], "'maybe'"),
        "missing image": (["train", "--config", cfg, "--train",
                           str(write_csv(tmp / "mi.csv", ["path", "label"], [["gone.png", "a"], [img, "b"]])),
                           "--out", str(tmp / "r"), "--set", "data.reference_class=a"], "gone.png"),
        "unknown preset": (["train", "--config", "colon", "--train", good, "--out", str(tmp / "r")], "unknown preset 'colon'"),
        "unknown field": (["train", "--config", cfg, "--train", good, "--out", str(tmp / "r"),
                           "--set", "model.sampels=3"], "unknown field 'sampels'"),
        "impossible setting": (["train", "--config", cfg, "--train", good, "--out", str(tmp / "r"),
                                "--set", "model.samples=0"], "samples"),
        "resume without checkpoint": (["train", "--config", cfg, "--train", good, "--out", str(tmp / "none"),
                                       "--resume"], "no checkpoint"),
        "no such run": (["evaluate", str(tmp / "norun"), good], "norun"),
        "a column twice": (["train", "--config", cfg, "--train",
                            str(write_csv(tmp / "twice.csv", ["path", "label", "path"], [[img, "a", img]])),
                            "--out", str(tmp / "r")], "the column 'path' appears twice"),
        "a mask of another shape": (["train", "--config", cfg, "--train",
                                     str(write_csv(tmp / "masked.csv", ["path", "label", "mask"],
                                                   [[img, "a", _mask(tmp, (40, 128))], [img, "b", ""]])),
                                     "--out", str(tmp / "r")], "not the same shape at any scale"),
        "a missing image, named as written and resolved": (
            ["train", "--config", cfg, "--train",
             str(write_csv(tmp / "rel.csv", ["path", "label"], [["sub/gone.png", "a"], [img, "b"]])),
             "--out", str(tmp / "r")], f"sub/gone.png (resolved to {tmp / 'sub/gone.png'})"),
        "evaluate with no draws": (["evaluate", str(tmp / "norun"), good, "--samples", "0"],
                                   "--samples 0: the number of draws must be at least 1"),
    }


def _mask(tmp: Path, size: tuple[int, int]) -> str:
    """A mask file of ``size`` (height, width)."""
    import numpy as np
    from PIL import Image

    path = tmp / f"mask-{size[0]}x{size[1]}.png"
    Image.fromarray(np.zeros(size, np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("case", [
    "missing csv", "misnamed column", "empty csv", "unknown val label", "missing image", "unknown preset",
    "unknown field", "impossible setting", "resume without checkpoint", "no such run", "a column twice",
    "a mask of another shape", "a missing image, named as written and resolved", "evaluate with no draws",
])
def test_bad_input_gives_one_clear_line(case, data, tmp_path, capsys):
    argv, needle = bad_inputs(data, tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("zoomnet: error: ") and needle in err and "Traceback" not in err


def test_debug_shows_the_traceback(data, tmp_path):
    with pytest.raises(UserError):
        main(["--debug", "evaluate", str(tmp_path / "norun"), str(data / "set/test.csv")])


@pytest.mark.parametrize("sets", [
    ["model.kind=ats"],
    ["model.kind=cnn", "model.cnn_scale=0.25"],
    ["data.class_weights=true", "data.augment=true", "train.lr_step=1"],
], ids=["ats", "cnn", "weights-augment-schedule"])
def test_other_models_and_options_train_and_evaluate(sets, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--val", str(data / "set/val.csv"), "--out", str(out), "--quiet", "--set", *sets]
    assert main(argv) == 0
    assert main(["evaluate", str(out), str(data / "set/test.csv")]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kind = json.loads((out / "config.json").read_text())["model"]["kind"]
    assert kind == (sets[0].split("=")[1] if sets[0].startswith("model.kind") else "zoomin")


def test_evaluate_prints_strict_json_when_a_metric_is_undefined(data, run, tmp_path, capsys):
    rows = list(csv.DictReader(open(data / "set/test.csv")))
    one_class = [r for r in rows if r["label"] == rows[0]["label"]]
    path = write_csv(tmp_path / "one.csv", ["path", "label"],
                     [[str(data / "set" / r["path"]), r["label"]] for r in one_class])
    assert main(["evaluate", str(run), str(path), "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NaN" not in last and json.loads(last)["auc"] is None  # AUC of one class: undefined


def test_cli_version(capsys):
    from zoomnet import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"zoomnet {__version__}"
