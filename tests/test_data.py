"""zoomnet.data: manifests, splits and the synthetic sets of make-data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image
from zoomnet.cli import main
from zoomnet.core.geometry import Box
from zoomnet.data.generators import standins
from zoomnet.sources import open_image

from helpers import _rows


def test_make_data_writes_manifests(data):
    for split in ("train", "val", "test"):
        rows = list(csv.DictReader(open(data / "set" / f"{split}.csv")))
        assert rows and set(rows[0]) == {"path", "label", "mask"}
        assert (data / "set" / rows[0]["path"]).is_file() and (data / "set" / rows[0]["mask"]).is_file()


def test_make_data_splits_keep_every_class_in_every_part(tmp_path):
    assert main(["make-data", "tiny-objects", str(tmp_path / "set"), "--num", "20", "--size", "128"]) == 0
    for part in ("train", "val", "test"):
        labels = {r["label"] for r in _rows(tmp_path / "set" / f"{part}.csv")}
        assert labels == {"negative", "positive"}, part


def _split_rows(folder):
    return [r for part in ("train", "val", "test") for r in csv.DictReader(open(folder / f"{part}.csv"))]


@pytest.mark.parametrize("kind, num, size, classes, shape", [
    ("colon-cancer", 8, 500, set(standins.COLON_CLASSES), lambda h, w: (h, w) == (500, 500)),
    ("traffic-signs", 10, 240, set(standins.SIGN_CLASSES), lambda h, w: (h, w) == (240, 320)),
    ("fmow", 12, 300, set(standins.FMOW_CLASSES), lambda h, w: 180 <= min(h, w) and max(h, w) <= 420),
])
def test_make_data_writes_each_stand_in(tmp_path, kind, num, size, classes, shape):
    out = tmp_path / kind
    assert main(["make-data", kind, str(out), "--num", str(num), "--size", str(size), "--seed", "1"]) == 0
    rows = _split_rows(out)
    assert len(rows) == num and {r["label"] for r in rows} <= classes
    for r in rows:
        img = np.asarray(Image.open(out / r["path"]))
        mask = np.asarray(Image.open(out / r["mask"])) > 0
        assert img.dtype == np.uint8 and img.shape[2] == 3 and shape(*img.shape[:2])
        assert mask.shape == img.shape[:2]
        has_object = r["label"] not in ("normal", standins.NO_SIGN)  # the classes without an object
        assert mask.any() == has_object, (r, mask.sum())
        if has_object:  # small objects (these test images are smaller than the defaults), where the pixels differ
            assert mask.mean() < 0.05
            assert np.abs(img[mask].astype(float).mean(0) - img[~mask].astype(float).mean(0)).max() > 10


def test_fmow_structures_are_distinct():
    """The ten fMoW stand-in classes are ten different footprints at every size drawn."""
    for d in (30, 44):
        prints = {k: standins._structure(k, d) for k in standins.FMOW_CLASSES}
        assert all(p.any() and p.mean() < 0.8 for p in prints.values())
        keys = list(prints)
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                assert (prints[a] != prints[b]).mean() > 0.05, (a, b, d)


def test_camelyon16_stand_in_is_pyramidal_slides_with_masks(tmp_path):
    from zoomnet.sources import open_image

    out = tmp_path / "c16"
    assert main(["make-data", "camelyon16", str(out), "--num", "2", "--size", "1024"]) == 0
    rows = _split_rows(out)
    assert sorted(r["label"] for r in rows) == ["normal", "tumor"]
    for r in rows:
        mask = np.asarray(Image.open(out / r["mask"])) > 0
        assert mask.shape == (64, 64) and mask.any() == (r["label"] == "tumor")
        slide = open_image(out / r["path"])
        assert (slide.height, slide.width) == (1024, 1024)


def test_needles_hard_has_smaller_lesions_and_lone_nuclei_everywhere(monkeypatch):
    """``needles-hard``: lesions smaller than ``needles``', and negatives hold lone nuclei of
    the lesions' look, so that the presence of dark nuclei alone does not give the label away."""
    from zoomnet.data.generators import needles as writers
    from zoomnet.data.generators.textures import histology_texture

    texture = histology_texture()
    easy = [writers.needles_image(np.random.default_rng(s), texture, 512, True)[1].mean() for s in range(6)]
    hard = [writers.needles_image(np.random.default_rng(s), texture, 512, True, hard=True)[1].mean() for s in range(6)]
    assert all(0 < h for h in hard) and max(hard) < 0.0025 and min(easy) > 0.0009, (hard, easy)
    painted = []
    real = writers._nucleus
    monkeypatch.setattr(writers, "_nucleus", lambda *a: painted.append(a[4:]) or real(*a))
    for hard_set, expected in ((False, 0), (True, 7)):
        painted.clear()
        img, mask = writers.needles_image(np.random.default_rng(1), texture, 512, False, hard=hard_set)
        assert not mask.any() and img.shape == (512, 512, 3)
        assert len(painted) >= expected and (expected or not painted)
        assert all(strength == (0.6 if hard_set else 1.0) for _, strength in painted)


def test_make_data_gigapixel_writes_a_consistent_pyramid(tmp_path):

    from zoomnet.cli import main

    path = tmp_path / "slide.tif"
    assert main(["make-data", "gigapixel", str(path), "--size", "1500", "--seed", "1"]) == 0
    src = open_image(path)
    assert (src.height, src.width) == (1500, 1500) and src.levels >= 3 and src.mpp == pytest.approx(0.5)
    lesions = json.loads(path.with_suffix(".lesions.json").read_text())["lesions"]
    assert len(lesions) == 3
    # a coarse level agrees with level 0 averaged down (JPEG at quality 85, texture detail)
    box = Box(256, 256, 512, 512)
    coarse = src.read(box, (64, 64))  # from the 1/8 level
    fine = F.avg_pool2d(src.read(box)[None], 8)[0]
    assert float((coarse - fine).abs().mean()) < 8.0
    # the lesion is dark at full resolution
    les = lesions[0]
    patch = src.read(Box(int(les["y"]) - 10, int(les["x"]) - 10, 20, 20))
    assert float(patch.mean()) < float(src.read(Box(0, 0, 1500, 1500), (64, 64)).mean())


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12), max_size=4),
                max_size=5),
       st.binary(max_size=40))
def test_fuzz_the_manifest_reader(tmp_path, cells, junk):
    """Any CSV (any cells, stray quotes and bytes, BOMs, missing columns) gives manifest rows
    or one UserError, never another exception."""
    import csv as _csv
    import io

    from zoomnet.data.manifest import read_manifest
    from zoomnet.errors import UserError

    buf = io.StringIO()
    _csv.writer(buf).writerows([["path", "label"], *cells])
    path = tmp_path / "fuzz.csv"
    path.write_bytes(buf.getvalue().encode("utf-8", "surrogatepass") + junk)
    try:
        rows = read_manifest(path)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
    else:
        assert rows and all(r.path and r.label for r in rows)


@pytest.mark.parametrize("step", [4, 2])
def test_make_data_slides_writes_pyramids_as_scanners_do(tmp_path, step):
    """``make-data slides``: BigTIFF pyramids at 4x (or 2x) steps of JPEG tiles, the pixel size
    in the metadata, tissue on glass, lesions on half the slides, small against the tissue,
    masks at 1/16 read lazily; glass tiles are the same bytes."""
    import json as _json

    import tifffile

    from zoomnet.cli import main
    from zoomnet.core.geometry import Box
    from zoomnet.sources.open import open_image
    from zoomnet.sources.tiff import TiffSource

    out = tmp_path / "slides"
    assert main(["make-data", "slides", str(out), "--num", "2", "--size", "6000", "--tile", "256",
                 "--level-downsample", str(step)]) == 0
    rows = _split_rows(out)
    assert sorted(r["label"] for r in rows) == ["normal", "tumor"]
    for r in rows:
        src = open_image(out / r["path"])
        assert isinstance(src, TiffSource) and src.mpp == pytest.approx(0.25)
        assert 1.2 <= src.width / src.height <= 2.05 and 1800 <= src.width <= 6000
        downsamples = [lv.downsample for lv in src._levels]
        assert len(downsamples) >= 2 and downsamples[1] == pytest.approx(step, rel=0.01)
        assert src._levels[0].tile == (256, 256)
        with tifffile.TiffFile(out / r["path"]) as tif:
            page = tif.pages[0]
            counts = list(page.databytecounts)
            assert max(counts.count(c) for c in set(counts)) > 1  # glass tiles: one encoding, written again
        meta = _json.loads((out / r["path"]).with_suffix(".lesions.json").read_text())
        assert 0.15 <= meta["tissue"] <= 0.40
        mask = open_image(out / r["mask"])
        assert (mask.height, mask.width) == (src.height // 16, src.width // 16)
        covered = float(mask.read(Box(0, 0, mask.height, mask.width))[0].gt(0).float().mean())
        if r["label"] == "tumor":
            assert meta["lesions"] and 0.0001 * 0.5 <= covered / meta["tissue"] <= 0.006
        else:
            assert not meta["lesions"] and covered == 0.0
