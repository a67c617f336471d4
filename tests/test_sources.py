"""zoomnet.sources: every way pixels reach the model, and what each bad image file gets."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from zoomnet import (
    ArraySource,
    CountingSource,
)
from zoomnet.cli import main
from zoomnet.core.geometry import Box
from zoomnet.errors import ImageError
from zoomnet.sources.held import NumpySource
from zoomnet.sources.lazy import LazyImage

from helpers import RGB, RNG, VALID_JPEG_TIFF, VALID_TIFF, tiff_bytes


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def make_file(tmp: Path, kind: str) -> Path:
    """Write one catalogue input; return its path."""
    files = {
        "truncated.tif": lambda: tiff_bytes(RGB)[:3000],
        "random.tif": lambda: RNG.integers(0, 255, 5000, dtype=np.uint8).tobytes(),
        "text.png": lambda: b"path,label\nthis is not an image\n",
        "truncated.png": lambda: png_bytes(RGB)[: len(png_bytes(RGB)) // 2],
        "gray.png": lambda: png_bytes(RGB[..., 0]),
        "rgba.png": lambda: png_bytes(np.dstack([RGB, np.full((128, 128), 200, np.uint8)])),
        "sixteen.png": lambda: png_bytes((RGB[..., 0].astype(np.uint16) * 257)),
        "small.png": lambda: png_bytes(RGB[:20, :20]),
        "rgb.png": lambda: png_bytes(RGB),
    }
    path = tmp / kind
    path.write_bytes(files[kind]())
    return path


# (case, image file, expected exit code, text the one-line error must contain)
IMAGE_CASES = [
    ("missing file", None, 2, "no such file"),
    ("truncated TIFF", "truncated.tif", 2, "cannot read the image"),
    ("random bytes named .tif", "random.tif", 2, "cannot read the image"),
    ("text named .png", "text.png", 2, "cannot read the image"),
    ("truncated PNG", "truncated.png", 2, "cannot read the image"),
    ("image smaller than a sub-tile", "small.png", 2, "smaller than one sub-tile"),
    ("grayscale", "gray.png", 0, ""),
    ("RGBA", "rgba.png", 0, ""),
    ("16-bit", "sixteen.png", 0, ""),
]


@pytest.mark.parametrize("case,name,code,needle", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_image_catalogue(case, name, code, needle, run, tmp_path, capsys):
    path = str(tmp_path / "gone.png") if name is None else str(make_file(tmp_path, name))
    assert main(["predict", str(run), path]) == code
    out = capsys.readouterr()
    if code:
        err = out.err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert needle in err and path in err, err
    else:
        result = json.loads(out.out.strip())
        assert abs(sum(result["probabilities"].values()) - 1) < 1e-5


def test_unusual_modes_are_converted_as_documented(tmp_path):
    from zoomnet.core.geometry import Box
    from zoomnet.sources import open_image

    gray = open_image(make_file(tmp_path, "gray.png")).read(Box(0, 0, 128, 128))
    assert gray.shape == (3, 128, 128) and torch.equal(gray[0], gray[2])  # repeated to RGB
    assert torch.equal(gray[0], torch.from_numpy(RGB[..., 0]).float())
    rgba = open_image(make_file(tmp_path, "rgba.png")).read(Box(0, 0, 128, 128))
    assert rgba.shape == (3, 128, 128) and torch.equal(rgba, torch.from_numpy(RGB).permute(2, 0, 1).float())
    sixteen = open_image(make_file(tmp_path, "sixteen.png")).read(Box(0, 0, 128, 128))
    assert torch.allclose(sixteen[0], torch.from_numpy(RGB[..., 0]).float(), atol=1.0)  # 65535 -> 255


VALID_PNG = png_bytes(RGB[:64, :64])


@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    base=st.sampled_from([("png", VALID_PNG), ("tif", VALID_TIFF), ("tif", VALID_JPEG_TIFF)]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8),
)
def test_fuzz_image_readers(base, cut, flips, tmp_path):
    """Corrupt PNG/TIFF bytes: the reader succeeds or raises ImageError, nothing else."""
    from zoomnet.core.geometry import Box
    from zoomnet.sources import open_image

    suffix, blob = base
    data = bytearray(blob[: max(1, int(len(blob) * cut))] if cut < 0.95 else blob)
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    path = tmp_path / f"fuzz.{suffix}"
    path.write_bytes(bytes(data))
    try:
        src = open_image(path)
        pixels = src.read(Box(0, 0, src.height, src.width), (8, 8))
        assert pixels.shape[0] == 3
    except ImageError as exc:
        assert str(path) in str(exc)


def test_paths_that_are_not_image_files_say_what_they_are(data, run, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    cases = {
        "folder.png": "a folder, not an image file",
        "pipe.png": "a named pipe (FIFO), not an image file",
        "a.png": "a loop of symbolic links",
        "images\\\\slide 1.png": "a Windows path?",
    }
    for name, needle in cases.items():
        manifest = tmp_path / "m.csv"
        manifest.write_text(f"path,label\n{name},positive\n")
        assert main(["evaluate", str(run), str(manifest), "--quiet"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    manifest.write_text("path,label\nx\x00y.png,positive\n")
    assert main(["evaluate", str(run), str(manifest), "--quiet"]) == 2
    assert "NUL byte" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(12, 10, 3), (12, 10)])
def test_array_source_takes_read_only_arrays_quietly(shape):
    """``np.asarray`` of a PIL image is read-only: torch would warn that the tensor over it
    is writable, though the source never writes to it."""
    import warnings

    from zoomnet import ArraySource
    from zoomnet.core.geometry import Box

    arr = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    arr.flags.writeable = False
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch gives this warning once a process: every time here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            src = ArraySource(arr, rgb=len(shape) == 3)
    finally:
        torch.set_warn_always(always)
    assert torch.equal(src.read(Box(0, 0, 12, 10))[0], torch.from_numpy(arr.copy()).float().reshape(12, 10, -1)[..., 0])


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


def test_pyramid_reads_equal_resampling_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    plain, pyramid = NumpySource(image), NumpySource(image, scales=(0.25, 0.5))
    for box, size in [(Box(0, 0, 64, 96), (16, 24)), (Box(32, 32, 32, 32), (16, 16)), (Box(-8, -8, 16, 16), None)]:
        assert torch.equal(plain.read(box, size), pyramid.read(box, size))


def test_read_many_equals_one_read_per_box():
    """Batched reads (inside, across the border, resampled or not) give each box's pixels."""
    from zoomnet.sources.base import read_many

    src = ArraySource(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8), fill=255)
    boxes = [Box(0, 0, 20, 20), Box(30, 50, 20, 20), Box(40, 60, 20, 20), Box(-5, 10, 20, 20)]
    for size in (None, (10, 10), (7, 9)):
        many = read_many(src, boxes, size)
        one = torch.stack([src.read(b, size) for b in boxes])
        torch.testing.assert_close(many, one, rtol=0, atol=1e-4)
    for strip in (300, 50):  # groups of 3 boxes of 20x20 (1,200 pixels); boxes above 200 pixels one at a time
        src.strip_pixels = strip
        for size in (None, (10, 10)):
            torch.testing.assert_close(read_many(src, boxes, size), torch.stack([src.read(b, size) for b in boxes]),
                                       rtol=0, atol=1e-4)
    src.strip_pixels = 250_000
    counting = CountingSource(src)
    read_many(counting, boxes[:2], (10, 10))
    assert counting.reads == [(boxes[0], (10, 10)), (boxes[1], (10, 10))]


def test_array_source_views_in_strips_equal_the_whole_resampled():
    """A large view of an in-memory image is resampled band by band from its 8-bit pixels
    (no float copy of the whole image) to the values of area resampling of the whole box,
    across the border too."""
    from zoomnet.sources.array import crop_with_fill, resize

    src = ArraySource(np.random.default_rng(0).integers(0, 256, (600, 700, 3), dtype=np.uint8), fill=255)
    src.strip_pixels = 20_000  # boxes above 80,000 pixels go in strips of a few rows
    cases = ((Box(0, 0, 600, 700), (60, 70)), (Box(-40, 25, 600, 700), (120, 140)),  # whole blocks of pixels
             (Box(-40, 25, 600, 700), (77, 91)), (Box(3, 7, 590, 690), (84, 76)))
    for box, size in cases:
        whole = resize(crop_with_fill(src.image, box, 255.0), size)
        torch.testing.assert_close(src.read(box, size), whole, rtol=0, atol=1e-3)


def test_a_png_over_pillows_bomb_limit_is_called_too_large_with_the_fix(run, data, monkeypatch, capsys):
    """Pillow refuses a plain image far over its pixel limit from the header alone; the
    line says it is too large and how to convert it, as for TIFF."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 128^2 is then over twice the limit
    assert main(["predict", str(run), str(data / "set/images/tiny_00001.png"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "too large to decode whole" in err and "vips tiffsave" in err, err


def test_a_slides_mask_is_read_band_by_band_never_at_the_slides_size(tmp_path, monkeypatch):
    """A mask stored at 1/16 of a large slide: whether it marks anything, and its coverage of
    the level-1 cells, come from bands of the stored mask (the same values as the whole
    read), never from the mask blown up to the slide's level-0 size."""
    from zoomnet.data.examples import Example
    from zoomnet.sources import mask as masks
    from zoomnet.sources.lazy import LazyImage

    monkeypatch.setattr(masks, "BAND_PIXELS", 4096)
    stored = np.zeros((320, 480), np.uint8)
    stored[301, 7] = 1  # one pixel of object, in the last band
    stored[40:100, 200:330] = 255
    tifffile.imwrite(tmp_path / "m.tif", stored, tile=(64, 64), compression="zlib")
    image = type("Slide", (), {"height": 320 * 16, "width": 480 * 16})()  # a 5120 x 7680 slide
    mask = masks.MaskSource(LazyImage(tmp_path / "m.tif", "m.tif"), image)
    reads = []
    inner = mask.src.read
    mask.src.read = lambda box, out_size=None: reads.append(box) or inner(box, out_size)
    assert Example(None, 1, mask).has_objects()
    assert max(b.height * b.width for b in reads) <= 4096 + 480  # bands, never the whole mask
    reads.clear()
    cells = mask.read(Box(0, 0, image.height, image.width), (8, 12))  # level-1 cells of 640 px
    assert len(reads) == 8 and max(b.height * b.width for b in reads) == 480 * 40  # one cell row's band at a time
    expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(stored > 0).float()[None], (8, 12))
    torch.testing.assert_close(cells, expected)
    empty = np.zeros_like(stored)
    tifffile.imwrite(tmp_path / "e.tif", empty, tile=(64, 64), compression="zlib")
    assert not Example(None, 0, masks.MaskSource(LazyImage(tmp_path / "e.tif", "e.tif"), image)).has_objects()

