"""zoomnet.runs.predict: cohorts of images and slides, streamed into a CSV that resumes, with their pictures and GeoJSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from zoomnet.cli import main
from zoomnet.core.geometry import Box
from zoomnet.sources import ArraySource
from zoomnet.sources.lazy import LazyImage

from helpers import _rows


def test_folder_and_manifests_stream_into_a_csv_that_resumes(data, run, tmp_path, capsys):
    images = sorted((data / "set/images").glob("*.png"))
    out = tmp_path / "pred.csv"
    # an unlabelled manifest of the first three images, as an interrupted cohort would leave
    first = tmp_path / "first.csv"
    first.write_text("path\n" + "".join(f"{p}\n" for p in images[:3]))
    assert main(["predict", str(run), str(first), "--out", str(out), "--deterministic"]) == 0
    assert [r["path"] for r in _rows(out)] == [str(p) for p in images[:3]]
    capsys.readouterr()
    # the whole folder: only the rest is predicted, every image once
    assert main(["predict", str(run), str(data / "set/images"), "--out", str(out), "--deterministic"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == len(images) - 3
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images) and len(rows) == len(images)


def test_a_labelled_manifest_reports_metrics(data, run, tmp_path, capsys):
    assert main(["predict", str(run), str(data / "set/test.csv"), "--deterministic"]) == 0
    lines = capsys.readouterr().out.splitlines()
    metrics = json.loads(lines[-1])["metrics"]
    assert metrics["images"] == len(lines) - 1 and 0.0 <= metrics["accuracy"] <= 1.0 and "auc" in metrics


def test_same_stem_images_keep_their_own_outputs_and_out_may_not_be_an_input(data, run, tmp_path, capsys):
    src = data / "set/images/tiny_00000.png"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(src, tmp_path / folder / "slide.png")
    assert main(["predict", str(run), str(tmp_path / "a/slide.png"), str(tmp_path / "b/slide.png"),
                 "--heatmaps", str(tmp_path / "heat"), "--geojson", str(tmp_path / "geo")]) == 0
    assert len(list((tmp_path / "heat").glob("slide*.png"))) == 2
    assert len(list((tmp_path / "geo").glob("slide*.geojson"))) == 2
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{src}\n")
    capsys.readouterr()
    assert main(["predict", str(run), str(manifest), "--out", str(manifest)]) == 2
    assert "one of the inputs" in capsys.readouterr().err
    assert manifest.read_text() == f"path\n{src}\n"  # untouched


def test_geojson_boxes_are_level0_pixels_of_the_original_file(data, run, tmp_path):
    """A run that works at 0.5 um/px predicts a slide scanned at 0.25 um/px: every sampled
    sub-tile in the GeoJSON, read from the original file and resampled to the sub-tile
    size, gives exactly the pixels the model read."""
    rescaled_run = tmp_path / "run"
    shutil.copytree(run, rescaled_run)
    config = json.loads((rescaled_run / "config.json").read_text())
    config["data"]["target_mpp"] = 0.5
    (rescaled_run / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    native = np.asarray(Image.open(data / "set/images/tiny_00003.png").convert("RGB").resize((300, 260)))
    native = np.clip(native.astype(int) + rng.integers(-20, 20, native.shape), 0, 255).astype(np.uint8)
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, native, resolution=(40000.0, 40000.0), resolutionunit="CENTIMETER")  # 0.25 um/px
    assert main(["predict", str(rescaled_run), str(slide), "--geojson", str(tmp_path / "geo"), "--seed", "1"]) == 0
    geo = json.loads((tmp_path / "geo/slide.geojson").read_text())
    assert geo["properties"]["level0_size"] == [260, 300] and geo["properties"]["prediction"]
    # the model's own reads, repeated with the same seed to recover its boxes
    src = LazyImage(slide, str(slide), target_mpp=0.5)
    from zoomnet.runs import load_run

    model, _ = load_run(rescaled_run)
    out = model.predict([src], generator=torch.Generator().manual_seed(1))
    leaves = [f for f in geo["features"] if f["properties"]["name"] == "sub-tile"]
    assert len(leaves) == len(out.leaf_boxes) > 0
    original = ArraySource(native)
    compared = 0
    for box, feature in zip(out.leaf_boxes, leaves):
        (ring,) = feature["geometry"]["coordinates"]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert min(xs) >= 0 and min(ys) >= 0 and max(xs) <= 300 and max(ys) <= 260  # clipped
        level0 = Box(min(ys), min(xs), max(ys) - min(ys), max(xs) - min(xs))
        inside = box.top >= 0 and box.left >= 0 and box.top + box.height <= src.height and box.left + box.width <= src.width
        if inside:
            assert torch.equal(original.read(level0, (box.height, box.width)), src.read(box))
            compared += 1
        assert set(feature["properties"]["measurements"]) == {"weight", "attention level 1", "attention level 2"}
    assert compared > 0
    cells = [f for f in geo["features"] if f["properties"]["name"] == "attention cell"]
    assert cells and abs(sum(f["properties"]["measurements"]["attention"] for f in cells) - 1) < 1e-4


def test_slide_heatmap_is_readable_and_the_attention_tiff_overlays_level0(data, run, tmp_path):
    big = np.asarray(Image.open(data / "set/images/tiny_00002.png").convert("RGB").resize((1200, 900)))
    path = tmp_path / "big.png"
    Image.fromarray(big).save(path)
    assert main(["predict", str(run), str(path), "--heatmaps", str(tmp_path / "heat"), "--heatmap-size", "1000",
                 "--attention-tiffs", str(tmp_path / "att"), "--deterministic"]) == 0
    picture = Image.open(tmp_path / "heat/big.png")
    assert picture.width > 1000 and picture.height >= 750  # the 1000 px view, colour bar and strip beside it
    with tifffile.TiffFile(tmp_path / "att/big.attention.tif") as tif:
        page = tif.pages[0]
        assert page.shape == (900, 1200, 3) and page.is_tiled and len(page.subifds or []) >= 1
        level0 = page.asarray()
    assert not list(tmp_path.glob("att/*.partial"))
    # the brightest part of the overlay lies in the tile the model weighted most
    from zoomnet.runs import load_run

    model, _ = load_run(run)
    src = LazyImage(path, str(path))
    out = model.predict([src], deterministic=True)
    (whole, alpha), = out.levels[0].maps[0].items()
    g_h, g_w = out.levels[0].grid
    best = int(alpha.argmax())
    t_h, t_w = model.config.levels[0].cell_stride()
    i, j = divmod(best, g_w)
    brightness = level0.astype(float).sum(-1)
    inside = brightness[int(i * t_h) : int((i + 1) * t_h), int(j * t_w) : int((j + 1) * t_w)].mean()
    assert inside > brightness.mean()


def _pyramid_with_damaged_level0(path, image: np.ndarray) -> None:
    """A JPEG-tiled pyramid whose level-0 tiles are garbage: its views read (coarser levels),
    its full-resolution sub-tiles do not."""
    levels = [image]
    while levels[-1].shape[0] > 16:
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((levels[-1].shape[1] // 2,) * 2, Image.BOX)))
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], tile=(16, 16), compression="jpeg", photometric="rgb", subifds=len(levels) - 1)
        for lv in levels[1:]:
            tw.write(lv, tile=(16, 16), compression="jpeg", photometric="rgb", subfiletype=1)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    with open(path, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset + 2)
            fh.write(b"\x00" * (count - 2))


def test_a_damaged_slide_in_a_cohort_is_skipped_and_the_others_predicted(data, run, tmp_path, capsys):
    images = tmp_path / "cohort"
    images.mkdir()
    for name in ("a.png", "c.png"):
        shutil.copy(data / "set/images/tiny_00001.png", images / name)
    _pyramid_with_damaged_level0(images / "b.tif", np.asarray(Image.open(data / "set/images/tiny_00002.png").convert("RGB")))
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(images), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("zoomnet: skipped") and "b.tif" in ln]
    assert "1 of 3 images could not be read (first: " in err and "b.tif" in err
    assert sorted(Path(r["path"]).name for r in _rows(out)) == ["a.png", "c.png"]


def test_rerunning_with_pictures_asked_writes_those_missing_and_prints_the_metrics(data, run, tmp_path, capsys):
    out = tmp_path / "p.csv"
    test = str(data / "set/test.csv")
    assert main(["predict", str(run), test, "--out", str(out), "--quiet"]) == 0
    rows = out.read_text()
    capsys.readouterr()
    heat = tmp_path / "heat"
    assert main(["predict", str(run), test, "--out", str(out), "--heatmaps", str(heat), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "4 images already in" in captured.err and "4 of them lacked the pictures" in captured.err
    assert len(list(heat.glob("*.png"))) == 4 and out.read_text() == rows  # rows kept as they were
    assert '{"metrics":' in captured.out  # a labelled manifest's metrics, again
    assert main(["predict", str(run), test, "--out", str(out), "--heatmaps", str(heat), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "lacked" not in captured.err and '{"metrics":' in captured.out


def test_an_interrupted_cohort_leaves_a_csv_the_rerun_completes(data, run, tmp_path, monkeypatch, capsys):
    import zoomnet.cli as cli

    out = tmp_path / "p.csv"
    argv = ["predict", str(run), str(data / "set/test.csv"), "--out", str(out), "--quiet"]
    seen = []

    def stop_after_one(result):
        seen.append(result)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_emit_prediction", stop_after_one)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "holds the images finished so far; finish with: zoomnet predict" in err
    assert len(_rows(out)) == 1
    monkeypatch.undo()
    assert main(argv) == 0
    assert len(_rows(out)) == 4


@pytest.mark.parametrize("flags, needle", [
    (["--samples", "0"], "--samples 0: the number of draws must be at least 1"),
    (["--samples", "-3"], "--samples -3: the number of draws must be at least 1"),
    (["--workers", "0"], "--workers 0: give at least 1 thread"),
    (["--batch", "0"], "--batch 0: give a whole number of images >= 1"),
    (["--heatmaps", "FILE"], "--heatmaps FILE: a file, not a folder"),
    (["--geojson", "FILE"], "--geojson FILE: a file, not a folder"),
    (["--attention-tiffs", "FILE"], "--attention-tiffs FILE: a file, not a folder"),
    (["--out", "DIR"], "--out DIR: a folder"),
])
def test_bad_predict_options_are_refused_before_any_work(flags, needle, data, run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR").mkdir()
    assert main(["predict", str(run), str(data / "set/images/tiny_00001.png"), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not list(tmp_path.glob("*.png"))


def test_out_of_memory_in_predict_names_what_to_lower(data, run, monkeypatch, capsys):
    import zoomnet.runs.predict as predict

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(predict, "_predict_one", oom)
    assert main(["predict", str(run), str(data / "set/images/tiny_00001.png"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory" in err and "model.chunk" in err


def test_a_sharded_cohort_gives_one_csv_and_a_killed_process_loses_nothing(data, run, tmp_path):
    """Two processes (as torchrun starts them) each predict every other input into a part
    file; rank 0 folds the parts into one CSV in the inputs' order. A process that died
    midway left a part: the rerun skips what it holds and merges it."""
    from zoomnet.runs import predict_images
    from zoomnet.runs.predict import part_files

    inputs = [str(data / "set/train.csv")]
    out = tmp_path / "p.csv"
    alone = predict_images(run, inputs, out_csv=tmp_path / "alone.csv", deterministic=True)
    # rank 1 is killed after its first image: its part holds one row
    with pytest.raises(KeyboardInterrupt):
        def die(result, seen=[]):
            seen.append(result)
            raise KeyboardInterrupt
        predict_images(run, inputs, out_csv=out, deterministic=True, shard=(1, 2), emit=die)
    assert len(part_files(out)) == 1 and not out.exists()
    # the rerun of both ranks: rank 1 skips its finished image, rank 0 merges
    predict_images(run, inputs, out_csv=out, deterministic=True, shard=(1, 2))
    predict_images(run, inputs, out_csv=out, deterministic=True, shard=(0, 2))
    assert not part_files(out)
    merged, whole = _rows(out), _rows(tmp_path / "alone.csv")
    assert [r["path"] for r in merged] == [r["path"] for r in whole] == [r["path"] for r in alone]
    assert [r["predicted"] for r in merged] == [r["predicted"] for r in whole]


@pytest.mark.slow  # two processes under torchrun
def test_torchrun_predict_writes_one_csv(data, run, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zoomnet",
           "predict", str(run), str(data / "set/train.csv"), "--out", str(out), "--deterministic", "--quiet",
           "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["predict", str(run), str(data / "set/train.csv"), "--out", str(tmp_path / "one.csv"),
                 "--deterministic", "--quiet"]) == 0
    assert [(r["path"], r["predicted"]) for r in _rows(out)] == [(r["path"], r["predicted"]) for r in _rows(tmp_path / "one.csv")]
    assert not list(tmp_path.glob(".p.csv.part-*"))


def test_a_batched_cohort_gives_what_one_at_a_time_gives(data, run, tmp_path, capsys):
    """Images of two sizes and an unreadable one, four a call: each net once per level for a
    group, the same predictions and pictures as one image at a time (deterministic draws)."""
    images = tmp_path / "cohort"
    images.mkdir()
    for i in range(5):
        shutil.copy(data / f"set/images/tiny_0000{i}.png", images / f"a{i}.png")
    big = np.asarray(Image.open(data / "set/images/tiny_00005.png").convert("RGB"))
    Image.fromarray(np.concatenate([big, big], axis=1)).save(images / "wide.png")
    (images / "broken.png").write_bytes(b"not a png")
    outs = {}
    for batch in ("1", "4"):
        out, pictures = tmp_path / f"b{batch}.csv", tmp_path / f"heat{batch}"
        code = main(["predict", str(run), str(images), "--out", str(out), "--batch", batch, "--deterministic",
                     "--heatmaps", str(pictures), "--geojson", str(pictures), "--quiet"])
        assert code == 2 and "broken.png" in capsys.readouterr().err
        outs[batch] = (out, pictures)
    # the same to float rounding (a batch's convolutions sum in another order)
    rows = {b: {r["path"]: [r["predicted"], float(r["p_positive"])] for r in _rows(out)} for b, (out, _) in outs.items()}
    assert rows["1"].keys() == rows["4"].keys() and len(rows["4"]) == 6
    for path, (label, p) in rows["1"].items():
        assert rows["4"][path][0] == label and rows["4"][path][1] == pytest.approx(p, abs=2e-6), path
    for name in [f"a{i}" for i in range(5)] + ["wide"]:
        one, four = (json.loads((outs[b][1] / f"{name}.geojson").read_text())["features"] for b in ("1", "4"))
        assert [f["geometry"] for f in one] == [f["geometry"] for f in four], name
        for a, b in zip(one, four):
            assert a["properties"]["measurements"] == pytest.approx(b["properties"]["measurements"], rel=1e-5), name
        pictures = [np.asarray(Image.open(outs[b][1] / f"{name}.png"), dtype=int) for b in ("1", "4")]
        assert np.abs(pictures[0] - pictures[1]).max() <= 1, name


def test_a_group_calls_each_net_once_per_level(run):
    from zoomnet.runs.loading import load_run

    model, config = load_run(run)
    rng = np.random.default_rng(0)
    sources = [ArraySource(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in range(4)]
    model.predict(sources[:1])  # the CPU's views per call measured once per net and view size (a probe of one row)
    calls = {"level 1": 0, "level 2": 0, "f": 0}
    for name, net in (("level 1", model.attention[0]), ("level 2", model.attention[1]), ("f", model.feature)):
        net.register_forward_hook(lambda *_a, name=name: calls.__setitem__(name, calls[name] + 1))
    model.predict(sources, generator=torch.Generator().manual_seed(0))
    assert calls == {"level 1": 1, "level 2": 1, "f": 1}
    for source in sources:
        model.predict([source], generator=torch.Generator().manual_seed(0))
    assert calls == {"level 1": 5, "level 2": 5, "f": 5}


def test_off_the_cpu_inference_runs_in_chunks_a_gpu_can_fill(run):
    from zoomnet.model.zoomin import GPU_CHUNKS
    from zoomnet.runs.loading import load_run

    model, _ = load_run(run)
    model.config.chunk, model.config.view_chunk = 1, 1  # the colon preset's, for a CPU's cache
    assert model.inference_chunks() == (1, 1)
    model.mean = torch.zeros(1, 3, 1, 1, device="meta")  # where the model's tensors live
    assert model.inference_chunks() == GPU_CHUNKS


def test_what_an_image_read_is_its_own_when_its_file_is_predicted_again(run, tmp_path, monkeypatch):
    """The open file is kept for the next image of the same path: each prediction reports
    the pixels and bytes it had decoded, not the file's running total."""
    from zoomnet.runs import predict_images
    from zoomnet.sources import lazy
    from zoomnet.sources.tiff import TiffSource

    rng = np.random.default_rng(0)
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(tiled, rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), tile=(64, 64), compression="zlib")
    monkeypatch.setattr(TiffSource, "cache_bytes", 0)  # every read decodes its tiles again
    lazy._OPEN.clear()
    first = predict_images(run, [str(tiled)], deterministic=True)[0]
    again = predict_images(run, [str(tiled)], deterministic=True)[0]  # the same reads, through the open file
    assert 0 < first["pixels_read"] <= 2 * 512 * 512 and 0 < first["bytes_read"]
    for key in ("pixels_read", "bytes_read"):  # its own reads (a running total would be twice the first's)
        assert 0.9 * first[key] <= again[key] <= first[key], key
    plain = tmp_path / "plain.png"  # decoded whole as it opens: counted for the image that opened it
    Image.fromarray(np.zeros((200, 300, 3), dtype=np.uint8)).save(plain)
    lazy._OPEN.clear()
    result = predict_images(run, [str(plain)], deterministic=True)[0]
    assert result["pixels_read"] == 200 * 300 and result["bytes_read"] > 0
