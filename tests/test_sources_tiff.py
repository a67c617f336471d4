"""zoomnet.sources.tiff and .slide: pyramidal TIFF and OpenSlide formats, read lazily and within the pixel budget."""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from zoomnet import ArraySource, LevelConfig, ModelConfig, ZoomIn
from zoomnet.cli import main
from zoomnet.core.geometry import Box
from zoomnet.errors import ImageError
from zoomnet.sources import open_image
from zoomnet.sources.tiff import TiffSource

from helpers import VALID_JPEG_TIFF, VALID_TIFF


def _tiff_fields(blob: bytes) -> list[tuple[str, int, int]]:
    """``(tag name, file offset, byte width)`` of every header field of every IFD worth
    fuzzing: the tag's type and count, and each element of its value."""
    import tifffile

    sizes = {1: 1, 3: 2, 4: 4, 13: 4, 16: 8}
    fields = []
    with tifffile.TiffFile(io.BytesIO(blob)) as tf:
        for page in [tf.pages[0], *[p for p in tf.series[0].levels[1:] for p in p.pages]]:
            for tag in page.tags.values():
                fields.append((f"{tag.name}.type", tag.offset + 2, 2))
                fields.append((f"{tag.name}.count", tag.offset + 4, 4))
                width = sizes.get(tag.dtype)
                if width:
                    for i in range(min(tag.count, 4)):
                        fields.append((f"{tag.name}[{i}]", tag.valueoffset + i * width, width))
    return fields


TIFF_FIELDS = {name: _tiff_fields(blob) for name, blob in (("zlib", VALID_TIFF), ("jpeg", VALID_JPEG_TIFF))}


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    base=st.sampled_from(["zlib", "jpeg"]),
    edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 32, 255, 256, 4096, 65535, 2**16, 2**31 - 1, 2**32 - 1]),
        st.integers(0, 2**32 - 1))), min_size=1, max_size=3),
)
def test_fuzz_tiff_header_fields(base, edits, tmp_path):
    """Rewrite header fields of a valid tiled pyramid (sizes, tile sizes, samples, bits,
    compression, photometric, planar, offsets, byte counts, SubIFDs; each tag's type and
    count) with edge values: opening and reading a view succeeds or raises ImageError naming
    the file, within seconds and within the pixel budget."""
    from zoomnet.core.geometry import Box
    from zoomnet.sources import open_image

    blob = bytearray(VALID_TIFF if base == "zlib" else VALID_JPEG_TIFF)
    fields = TIFF_FIELDS[base]
    for where, value in edits:
        _, offset, width = fields[int(where * len(fields))]
        blob[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    path = tmp_path / "fuzz.tif"
    path.write_bytes(bytes(blob))
    start = time.perf_counter()
    try:
        src = open_image(path, max_pixels=1_000_000)
        view = src.read(Box(0, 0, src.height, src.width), (8, 8))
        assert view.shape == (3, 8, 8) and torch.isfinite(view).all()
        src.read(Box(0, 0, 16, 16))
    except ImageError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc).strip()
    assert time.perf_counter() - start < 10


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (compression and downsampling change it little)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 32 + 2, w // 32 + 2, generator=g) * 255
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 255).permute(1, 2, 0).byte().numpy()


def area_down(img: np.ndarray, f: int) -> np.ndarray:
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    return F.avg_pool2d(t, f)[0].permute(1, 2, 0).round().byte().numpy()


def write_pyramid(path, img, layout: str, compression: str = "zlib", tile=(64, 64)):
    """Pyramids as SubIFDs (OME-TIFF style), as pages, or SVS-like (Aperio description,
    thumbnail page between level 0 and the reduced levels)."""
    levels = [img, area_down(img, 2), area_down(img, 4)]
    kw = dict(tile=tile, compression=compression, photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        if layout == "subifds":
            tw.write(levels[0], subifds=2, resolution=(20000.0, 20000.0), resolutionunit="CENTIMETER", **kw)
            for lv in levels[1:]:
                tw.write(lv, subfiletype=1, **kw)
        elif layout == "pages":
            tw.write(levels[0], **kw)
            for lv in levels[1:]:
                tw.write(lv, subfiletype=1, **kw)
        elif layout == "svs":
            kw["metadata"] = None  # no tifffile "shaped" description: Aperio's alone
            desc = f"Aperio Image Library v12.0.0\n{img.shape[1]}x{img.shape[0]} [0,0 ...] (64x64) JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990"
            tw.write(levels[0], description=desc, **kw)
            tw.write(levels[2][::4, ::4], photometric="rgb", description="Aperio Image Library thumbnail", metadata=None)
            for lv in levels[1:]:
                tw.write(lv, description="Aperio Image Library v12.0.0\nlevel", **kw)
    return path


IMG = smooth_image(512, 640)


@pytest.mark.parametrize("layout", ["subifds", "pages", "svs"])
def test_levels_and_regions_match_the_array(layout, tmp_path):
    src = open_image(write_pyramid(tmp_path / f"{layout}.tif", IMG, layout))
    assert isinstance(src, TiffSource) and (src.height, src.width) == (512, 640)
    assert src.levels == 3
    full = src.read(Box(100, 200, 37, 53))  # level 0, exact
    assert torch.equal(full, torch.from_numpy(IMG[100:137, 200:253]).permute(2, 0, 1).float())
    edge = src.read(Box(500, 630, 20, 20))  # past the image: fill
    assert (edge[:, 12:, :] == 0).all() and (edge[:, :, 10:] == 0).all()
    assert src.level_for(4.0) == 2 and src.level_for(3.9) == 1 and src.level_for(1.0) == 0


def test_physical_resolution_is_reported(tmp_path):
    assert open_image(write_pyramid(tmp_path / "s.tif", IMG, "subifds")).mpp == pytest.approx(0.5)
    assert open_image(write_pyramid(tmp_path / "v.tif", IMG, "svs")).mpp == pytest.approx(0.499)
    assert open_image(write_pyramid(tmp_path / "p.tif", IMG, "pages")).mpp is None


@pytest.mark.parametrize("compression", ["zlib", "jpeg", "lzw"])
def test_views_through_the_pyramid_match_the_in_memory_view(compression, tmp_path):
    """A view read through a pyramid level equals the view computed from the whole image in
    memory within 2 gray levels on average (zlib) or 4 (JPEG at quality 75): the level
    itself is an area-downsampled copy, and sampling positions differ by under a pixel."""
    tiff = open_image(write_pyramid(tmp_path / "p.tif", IMG, "subifds", compression))
    mem = ArraySource(IMG)
    tol = 4.0 if compression == "jpeg" else 2.0
    for box, size in [(Box(0, 0, 512, 640), (64, 80)), (Box(128, 256, 128, 128), (32, 32)), (Box(-20, 600, 96, 96), (24, 24))]:
        a, b = tiff.read(box, size), mem.read(box, size)
        assert a.shape == b.shape
        assert float((a - b).abs().mean()) < tol, (box, float((a - b).abs().mean()))


def test_a_model_predicts_the_same_on_png_and_pyramid(tmp_path):
    torch.manual_seed(0)
    model = ZoomIn(ModelConfig(levels=[LevelConfig(0.125, (128, 128)), LevelConfig(0.5, (32, 32), (16, 16))], samples=8))
    tiff = open_image(write_pyramid(tmp_path / "p.tif", IMG, "subifds"))
    a = torch.softmax(model.predict([ArraySource(IMG)], deterministic=True).logits, 1)
    b = torch.softmax(model.predict([tiff], deterministic=True).logits, 1)
    assert float((a - b).abs().max()) < 0.02


def test_prediction_never_decodes_a_whole_level_zero(tmp_path):
    big = smooth_image(2048, 2048, seed=1)
    path = write_pyramid(tmp_path / "big.tif", big, "subifds", tile=(128, 128))
    src = open_image(path)
    model = ZoomIn(ModelConfig(levels=[LevelConfig(1 / 16, (512, 512)), LevelConfig(0.25, (64, 64), "tiled")], samples=6))
    model.predict([src], generator=torch.Generator().manual_seed(0))
    # bound: the level-1 view comes from the 1/4 level (512^2 px); 6 distinct tile views from
    # the 1/4 level (6 x 2^2 tiles of 128^2); 6 sub-tiles at level 0 (each in at most 2x2 tiles)
    bound = 512 * 512 + 6 * 4 * 128 * 128 + 6 * 4 * 128 * 128
    assert 0 < src.pixels_decoded <= bound < 2048 * 2048
    assert 0 < src.bytes_read < src.file_size


@pytest.mark.parametrize("content", [b"", b"II*\x00garbage", b"MM\x00*" + bytes(200)])
def test_corrupt_tiffs_give_one_clear_error(content, tmp_path):
    path = tmp_path / "bad.tif"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="bad.tif"):
        open_image(path)


def test_truncated_tiff_gives_a_clear_error(tmp_path):
    path = write_pyramid(tmp_path / "t.tif", IMG, "subifds")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="t.tif"):
        src = open_image(path)
        src.read(Box(0, 0, 512, 640), (64, 80))
        src.read(Box(0, 0, 512, 640))


def test_target_resolution_rescales_a_slide(tmp_path):
    """A slide at 0.25 um/px seen at 0.5 um/px: half the size, each box read from twice the
    native box."""
    from zoomnet.sources.rescaled import RescaledSource

    native = open_image(write_pyramid(tmp_path / "s.tif", IMG, "subifds"))  # 0.5 um/px
    native.mpp = 0.25  # as if scanned twice as finely
    src = RescaledSource(native, 0.5)
    assert (src.height, src.width) == (256, 320)
    a = src.read(Box(10, 20, 16, 16))
    b = ArraySource(IMG).read(Box(20, 40, 32, 32), (16, 16))
    assert float((a - b).abs().mean()) < 2.0
    with pytest.raises(ImageError, match="microns per pixel"):
        RescaledSource(ArraySource(IMG), 0.5, "plain.png")


def test_openslide_formats_are_read_through_a_guarded_openslide(tmp_path):
    pytest.importorskip("openslide")
    from zoomnet.sources.slide import OpenSlideSource

    path = tmp_path / "slide.ndpi"  # OpenSlide reads a generic tiled TIFF under any name
    tifffile.imwrite(path, IMG, tile=(64, 64), photometric="rgb", compression="zlib")
    src = open_image(path, fill=255)
    assert isinstance(src, OpenSlideSource) and (src.height, src.width) == (512, 640)
    assert torch.equal(src.read(Box(100, 200, 37, 53)), torch.from_numpy(IMG[100:137, 200:253]).permute(2, 0, 1).float())
    view = src.read(Box(0, 0, 512, 640), (64, 80))
    assert float((view - ArraySource(IMG).read(Box(0, 0, 512, 640), (64, 80))).abs().mean()) < 1.0
    assert (src.read(Box(-10, -10, 20, 20))[:, :10, :10] == 255).all()  # outside: the fill


def test_a_vendor_slide_without_coarse_levels_keeps_to_the_pixel_budget(tmp_path):
    """One level only: a whole-slide view would decode level 0; refused before decoding."""
    pytest.importorskip("openslide")
    from zoomnet.sources.slide import OpenSlideSource

    path = tmp_path / "flat.ndpi"
    tifffile.imwrite(path, IMG, tile=(64, 64), photometric="rgb", compression="zlib")
    src = open_image(path, max_pixels=100_000)
    assert isinstance(src, OpenSlideSource)
    assert src.read(Box(0, 0, 256, 256)).shape == (3, 256, 256)  # 65,536 pixels: within the budget
    before = src.pixels_decoded
    with pytest.raises(ImageError, match=r"flat.ndpi: one read would decode 640x512 pixels.*data.max_pixels is 100,000"):
        src.read(Box(0, 0, 512, 640), (64, 80))
    assert src.pixels_decoded == before  # nothing was decoded


def test_a_corrupt_vendor_slide_costs_one_error_not_the_process(tmp_path):
    pytest.importorskip("openslide")
    path = tmp_path / "broken.ndpi"
    path.write_bytes(b"II*\x00" + np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="broken.ndpi.*OpenSlide"):
        open_image(path)


def test_plain_images_above_the_limit_are_refused_with_the_fix(tmp_path):
    from PIL import Image
    from zoomnet.sources.pillow import PillowSource

    path = tmp_path / "big.png"
    Image.fromarray(IMG).save(path)
    with pytest.raises(ImageError, match="big.png.*too large.*pyramidal TIFF"):
        PillowSource(path, max_pixels=100_000)


def test_every_defined_pixel_type_predicts_like_the_8bit_png_and_the_rest_are_refused(tmp_path, run, data, capsys):

    rgb = np.asarray(Image.open(data / "set/images/tiny_00001.png").convert("RGB"))
    gray = rgb.mean(axis=2).round().astype(np.uint8)
    binary = np.where(gray > 180, 255, 0).astype(np.uint8)
    palette_idx = (rgb[..., 0] // 64).astype(np.uint8)  # 4 colours
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :4] = np.array([[0, 90, 170, 250], [40, 60, 200, 10], [255, 128, 30, 90]]) * 257
    palette_rgb = (cmap[:, palette_idx].transpose(1, 2, 0) // 257).astype(np.uint8)
    c, m, y = 255 - rgb[..., 0], 255 - rgb[..., 1], 255 - rgb[..., 2]
    writes = {  # name: (reference 8-bit picture, how to write the same picture as a TIFF)
        "float01": (rgb, lambda p: tifffile.imwrite(p, rgb.astype(np.float32) / 255, photometric="rgb")),
        "float255": (rgb, lambda p: tifffile.imwrite(p, rgb.astype(np.float32), photometric="rgb")),
        "sixteen": (rgb, lambda p: tifffile.imwrite(p, rgb.astype(np.uint16) * 257, photometric="rgb")),
        "onebit": (binary, lambda p: tifffile.imwrite(p, binary > 0, photometric="minisblack")),
        "palette": (palette_rgb, lambda p: tifffile.imwrite(p, palette_idx, photometric="palette", colormap=cmap)),
        "cmyk": (rgb, lambda p: tifffile.imwrite(p, np.stack([c, m, y, np.zeros_like(c)], -1), photometric="separated")),
        "grayalpha": (gray, lambda p: tifffile.imwrite(p, np.stack([gray, np.full_like(gray, 255)], -1),
                                                      photometric="minisblack", extrasamples=["unassalpha"])),
        "planar": (rgb, lambda p: tifffile.imwrite(p, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")),
        "miniswhite": (gray, lambda p: tifffile.imwrite(p, 255 - gray, photometric="miniswhite")),
    }

    def predict(path) -> dict:
        capsys.readouterr()
        assert main(["predict", str(run), str(path), "--deterministic", "--quiet"]) == 0, path
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["probabilities"]

    for name, (reference, write) in writes.items():
        png = tmp_path / f"{name}.png"
        Image.fromarray(reference).save(png)
        write(tmp_path / f"{name}.tif")
        want, got = predict(png), predict(tmp_path / f"{name}.tif")
        assert all(abs(want[k] - got[k]) < 1e-4 for k in want), (name, want, got)
    refused = {
        "int16": (lambda p: tifffile.imwrite(p, gray.astype(np.int16)), "int16 samples have no display range"),
        "uint32": (lambda p: tifffile.imwrite(p, gray.astype(np.uint32)), "uint32 samples have no display range"),
        "float300": (lambda p: tifffile.imwrite(p, gray.astype(np.float32) * 300), "neither 0..1 nor 0..255"),
        "five": (lambda p: tifffile.imwrite(p, np.zeros((128, 128, 5), np.uint8), photometric="minisblack",
                                            planarconfig="contig"), "not gray or RGB"),
        # planar RGB pages, as scikit-image's multipage_rgb.tif
        "stack": (lambda p: tifffile.imwrite(p, np.zeros((2, 3, 128, 128), np.uint8), planarconfig="separate",
                                             photometric="rgb"), "holds 2 images"),
    }
    for name, (write, needle) in refused.items():
        write(tmp_path / f"{name}.tif")
        capsys.readouterr()
        assert main(["predict", str(run), str(tmp_path / f"{name}.tif")]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (name, err)


def _header_bomb(path, height: int, width: int, tile: int | None = None) -> None:
    """A few hundred bytes whose header claims ``height x width`` pixels."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), **({"tile": (16, 16)} if tile else {}))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        tif.pages[0].tags["ImageLength"].overwrite(height)


@pytest.mark.filterwarnings("ignore")
def test_size_bombs_and_tiny_tiles_get_the_pixel_budget_not_the_memory(tmp_path, run, capsys, monkeypatch):
    from zoomnet.sources import tiff

    _header_bomb(tmp_path / "huge.tif", 1_000_000, 1_000_000)
    _header_bomb(tmp_path / "strip.tif", 1_000_000, 64)
    _header_bomb(tmp_path / "tiles.tif", 4096, 4096, tile=16)
    monkeypatch.setattr(tiff, "MAX_TILES_PER_READ", 4096)  # 16 px tiles on a 4096^2 level: 65,536 per view
    for name, needle in (("huge.tif", "data.max_pixels is 256,000,000"), ("strip.tif", "data.max_pixels"),
                         ("tiles.tif", "tiles of 16x16")):
        assert (tmp_path / name).stat().st_size < 2000
        capsys.readouterr()
        assert main(["predict", str(run), str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "raise data.max_pixels" in err, (name, err)


def test_tiles_decoded_in_a_thread_pool_equal_one_at_a_time(tmp_path):
    """A read's tiles are decoded together in threads: the same pixels, and the I/O
    accounting (tiles decoded, compressed bytes) as one at a time."""
    path = write_pyramid(tmp_path / "jpeg.tif", IMG, "pages", compression="jpeg")
    boxes = [(Box(0, 0, 512, 640), None), (Box(30, 70, 300, 400), None), (Box(-20, -20, 512, 640), (128, 160)),
             (Box(100, 200, 37, 53), None)]
    results = {}
    for workers in (1, 4):
        src = open_image(path)
        src.tile_workers = workers
        results[workers] = ([src.read(b, size) for b, size in boxes], src.pixels_decoded, src.bytes_read)
    (one, px1, by1), (many, px4, by4) = results[1], results[4]
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    assert (px1, by1) == (px4, by4) and px1 > 0


@pytest.mark.parametrize("shape, layout", [((2048, 2048, 3), "strip"), ((64, 60000, 3), "strip"),
                                           ((2048, 2048, 3), "tiled")])
def test_a_large_image_stored_whole_is_read_with_memory_bounded_by_its_bytes(tmp_path, shape, layout):
    """A single-strip (or one-level tiled) TIFF has no coarser level to read a view from: its
    view is resampled band by band, so no float copy of the whole image is ever made; the
    values are those of resampling the whole image at once."""
    from zoomnet.bench import PeakTensorMemory
    from zoomnet.sources.array import resize

    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "whole.tif"
    tifffile.imwrite(path, image, photometric="rgb", **({"tile": (256, 256)} if layout == "tiled" else {}))
    src = TiffSource(path)
    view = (max(1, shape[0] // 16), max(1, shape[1] // 16))
    with PeakTensorMemory() as mem:
        got = src.read(Box(0, 0, shape[0], shape[1]), view)
    whole_float = shape[0] * shape[1] * 3 * 4
    # at most a band of rows in float (a band is one output row's input at least: for a
    # very wide image about the image's own bytes), never the whole image
    assert mem.peak < 0.6 * whole_float, (mem.peak, whole_float)
    if shape[0] >= 1024:
        assert mem.peak < whole_float / 4, (mem.peak, whole_float)
    want = resize(torch.from_numpy(image).permute(2, 0, 1).float(), view)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_an_array_source_keeps_the_callers_pixels_without_a_copy():
    from zoomnet.sources import ArraySource

    image = np.random.default_rng(0).integers(0, 256, (512, 384, 3), dtype=np.uint8)
    src = ArraySource(image)
    assert src.image.data_ptr() == image.ctypes.data  # a view of the caller's array
    crop = src.read(Box(10, 20, 30, 40))
    assert crop.is_contiguous() and torch.equal(crop, torch.from_numpy(image[10:40, 20:60]).permute(2, 0, 1).float())

