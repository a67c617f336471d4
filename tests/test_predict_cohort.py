"""Prediction of cohorts (folders, manifests with and without labels, resuming into a CSV)
and GeoJSON in level-0 pixels of the original file."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from zoomnet.cli import main
from zoomnet.core.geometry import Box
from zoomnet.data.manifest import LazyImage
from zoomnet.sources import ArraySource


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


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


def test_a_small_mask_maps_onto_a_rescaled_slide(tmp_path):
    """A 0.25 um/px slide seen at 0.5 um/px, its mask stored at a quarter of level 0: a box of
    the model's frame reads the mask where the object is, and nowhere else."""
    from zoomnet.data.manifest import load_examples

    slide = np.full((400, 400, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", slide, resolution=(40000.0, 40000.0), resolutionunit="CENTIMETER")
    mask = np.zeros((100, 100), np.uint8)
    mask[60:70, 20:30] = 255  # level 0 rows 240-280, columns 80-120: model frame 120-140, 40-60
    Image.fromarray(mask).save(tmp_path / "m.png")
    (tmp_path / "set.csv").write_text("path,label,mask\ns.tif,positive,m.png\n")
    (ex,) = load_examples(tmp_path / "set.csv", ["negative", "positive"], target_mpp=0.5)
    assert (ex.mask.height, ex.mask.width) == (ex.source.height, ex.source.width) == (200, 200)
    assert float(ex.mask.read(Box(120, 40, 20, 20)).min()) == 1.0
    assert float(ex.mask.read(Box(0, 0, 100, 200)).max()) == 0.0
    assert ex.mask.read(Box(100, 20, 60, 60), (6, 6))[0, 2:4, 2:4].min() > 0  # resampled onto a grid
    assert ex.has_objects()


def test_make_data_splits_keep_every_class_in_every_part(tmp_path):
    assert main(["make-data", "tiny-objects", str(tmp_path / "set"), "--num", "20", "--size", "128"]) == 0
    for part in ("train", "val", "test"):
        labels = {r["label"] for r in _rows(tmp_path / "set" / f"{part}.csv")}
        assert labels == {"negative", "positive"}, part


def test_exif_orientation_is_read_as_displayed(tmp_path):
    from zoomnet.sources.open import image_size, open_image

    shown = np.zeros((40, 60, 3), np.uint8)
    shown[:10, :20] = 255  # a white block at the top left, as displayed
    stored = np.rot90(shown, k=1).copy()  # stored turned; EXIF 6 turns it back (90 degrees clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("turned.jpg", "turned.png"):
        Image.fromarray(stored).save(tmp_path / name, exif=exif.tobytes(), **({"quality": 100} if name.endswith("jpg") else {}))
        assert image_size(tmp_path / name) == (40, 60)
        pixels = open_image(tmp_path / name).read(Box(0, 0, 40, 60))
        assert pixels.shape == (3, 40, 60)
        assert float(pixels[:, :10, :20].mean()) > 200 and float(pixels[:, 20:, 30:].mean()) < 50, name


def test_target_resolution_refuses_an_implausible_pixel_size(tmp_path):
    from zoomnet.errors import ImageError

    image = np.full((300, 300, 3), 128, np.uint8)
    tifffile.imwrite(tmp_path / "screen.tif", image, resolution=(72.0, 72.0), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "coarse.tif", image, resolution=(1000.0, 1000.0), resolutionunit="CENTIMETER")
    for name, needle in (("screen.tif", "no slide's or scene's pixel size"), ("coarse.tif", "coarser than")):
        try:
            LazyImage(tmp_path / name, name, target_mpp=0.5)
        except ImageError as exc:
            assert needle in str(exc) and name in str(exc)
        else:
            raise AssertionError(f"{name} was accepted")
