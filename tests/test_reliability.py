"""Reliability: a catalogue of bad inputs, crash safety, determinism, safe loading, fuzzing,
numerical safety. docs/errors.md lists what each bad input gets."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from zoomnet.cli import main
from zoomnet.errors import ImageError, UserError


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def tiff_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (128, 128, 3), dtype=np.uint8)


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


CONFIG_CASES = [
    ("unknown field", ["model.sampels=3"], "unknown field 'sampels'"),
    ("region smaller than its stride", ["model.levels.1.stride=[64,64]"], "smaller than its cell stride"),
    ("N <= 0", ["model.samples=0"], "samples"),
    ("scale outside (0, 1]", ["model.levels.0.scale=1.5"], "model.levels[1].scale=1.5: give a finite number > 0 and <= 1"),
    ("a truth value as a word", ["model.tissue_mask=maybe"], "model.tissue_mask='maybe': give true or false"),
    ("a count as a word", ["model.samples=ten"], "model.samples='ten': give a whole number >= 1"),
    ("one number for a region", ["model.levels.1.region=64"], "model.levels[2].region=64: give two whole numbers"),
    ("a scale as a word", ["model.levels.0.scale=abc"], "model.levels[1].scale='abc'"),
    ("a stride below a pixel", ["model.levels.1.stride=[0.01,0.01]"], "a stride below one pixel"),
    ("an attention net of depth 0", ["model.attention_depth=0"], "model.attention_depth=0"),
    ("smoothing as a word", ["model.smooth=abc"], "model.smooth='abc'"),
    ("unknown net", ["model.feature=vgg"], "unknown feature net"),
    ("bad net option", ["model.feature_kwargs={\"depth\": 3}"], "feature_kwargs"),
    ("not key=value", ["model.samples"], "expected key=value"),
    ("epochs not a number", ["train.epochs=abc"], "train.epochs='abc'"),
    ("zero epochs", ["train.epochs=0"], "train.epochs=0"),
    ("negative batch", ["train.batch_size=-1"], "train.batch_size=-1"),
    ("negative lr", ["train.lr=-1"], "train.lr=-1"),
    ("NaN lr", ["train.lr=NaN"], "train.lr=nan"),
    ("huge lr", ["train.lr=1e30"], "diverges"),
    ("contrastive start", ["train.contrastive_from=soon"], "contrastive_from"),
    ("zero pixel std", ["model.pixel_std=[64,0,64]"], "pixel_std"),
    ("fill as a word", ["data.fill=white"], "data.fill='white'"),
    ("negative mpp", ["data.target_mpp=-0.5"], "data.target_mpp"),
]


@pytest.mark.parametrize("case,sets,needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_catalogue(case, sets, needle, data, tmp_path, capsys):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--out", str(tmp_path / "r"), "--quiet", "--set", *sets]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r").exists()  # checked before anything is written


def test_binary_labels_without_a_negative_class_train_with_the_multiclass_terms(data, tmp_path, capsys):
    img = data / "set/images/tiny_00000.png"
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{img},cat\n{img},dog\n")
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(labels), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    assert "no reference (negative) class among cat, dog" in capsys.readouterr().out
    assert json.loads((tmp_path / "r/config.json").read_text())["data"]["reference_class"] == "none"
    # a named reference class that is not a label is refused in one line
    assert main([*argv, "--out", str(tmp_path / "r2"), "--set", "data.reference_class=bird"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'bird' is not a class (cat, dog)" in err


def _train_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "zoomnet", "train", "--config", str(data / "tiny.json"),
            "--train", str(data / "set/train.csv"), "--out", str(out), "--epochs", str(epochs), "--quiet",
            "--device", "cpu", "--set", "model.train_samples=32"]


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(data, whole, 4), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, killed, 4), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in epoch 2 (or later): the run dies without cleaning up
    proc.wait()
    from zoomnet.checkpoint import read_description

    epochs_done = read_description(killed / "last.safetensors")["state"]["epoch"]
    assert 1 <= epochs_done < 4, "the kill came after the run ended; slow the run down"
    from zoomnet.checkpoint import load_checkpoint

    load_checkpoint(killed / "last.safetensors")  # whole, loadable
    subprocess.run(_train_cmd(data, killed, 4)[:-2] + ["--resume", "--set", "model.train_samples=32"],
                   check=True, env=env, capture_output=True)
    a, _ = load_checkpoint(whole / "last.safetensors")
    b, _ = load_checkpoint(killed / "last.safetensors")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k  # bitwise: same machine, same threads, same seed
    rows_a = list(csv.DictReader(open(whole / "metrics.csv")))
    rows_b = list(csv.DictReader(open(killed / "metrics.csv")))
    assert [r["loss_ce"] for r in rows_a] == [r["loss_ce"] for r in rows_b]


class _Crash(BaseException):
    """A process killed between two file operations (not an Exception: nothing catches it)."""


@pytest.mark.slow  # eight short trainings: `make test-slow`, run by .ci/run
def test_a_crash_at_any_instant_of_saving_resumes_to_the_same_end(data, tmp_path, monkeypatch):
    """Kill the run before each rename of the end of one epoch (optimiser state, best and
    last checkpoints, their readable copies, metrics): the folder predicts, and resuming it
    gives bitwise the weights, best weights, description and metrics of a run never
    interrupted, with no temporary file left."""
    from zoomnet.checkpoint import load_checkpoint, read_description

    # no validation set: the best epoch is by training accuracy, which rises, so later epochs write best weights
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--epochs", "3", "--quiet", "--device", "cpu", "--set", "model.train_samples=8"]
    real_replace = os.replace
    renames: list[str] = []

    def counting(src, dst, *a, **k):
        renames.append(Path(dst).name)
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", counting)
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(os, "replace", real_replace)
    # the renames of each epoch end with metrics.csv; test the last epoch that wrote best weights
    ends = [i for i, name in enumerate(renames) if name == "metrics.csv"]
    epochs = [renames[a + 1 : b + 1] for a, b in zip([-1, *ends], ends)]
    chosen = max((e for e in range(1, len(epochs)) if "best.safetensors" in epochs[e]), default=len(epochs) - 1)
    first = sum(len(e) for e in epochs[:chosen])
    assert {"last.optim.pt", "prev.optim.pt", "last.safetensors", "metrics.csv"} <= set(epochs[chosen])
    print("renames at the end of the epoch tested:", epochs[chosen])

    def same(a: Path, b: Path) -> None:
        for name in ("last.safetensors", "best.safetensors"):
            x, state_x = load_checkpoint(a / name)
            y, state_y = load_checkpoint(b / name)
            for (k, u), (_, v) in zip(x.state_dict().items(), y.state_dict().items()):
                assert torch.equal(u, v), (name, k)
            drop = lambda st: {**st, "history": [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in st["history"]]}
            assert drop(state_x) == drop(state_y)
            assert read_description(b / name) == json.loads((b / name).with_suffix(".json").read_text())
        strip = lambda p: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in csv.DictReader(open(p))]
        assert strip(a / "metrics.csv") == strip(b / "metrics.csv")

    for k in range(len(epochs[chosen])):
        out = tmp_path / f"crash{k}"
        calls = [0]

        def crashing(src, dst, *a, **kw):
            calls[0] += 1
            if calls[0] == first + k + 1:
                raise _Crash(f"killed before renaming {Path(dst).name}")
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", crashing)
        with pytest.raises(_Crash):
            main([*argv, "--out", str(out)])
        monkeypatch.setattr(os, "replace", real_replace)
        (out / ".last.safetensors.x1y2.tmp").write_bytes(b"half")  # what SIGKILL leaves: no cleanup runs
        # the folder as the crash left it predicts (best weights of an earlier epoch) ...
        assert main(["predict", str(out), str(data / "set/images/tiny_00000.png"), "--quiet"]) == 0
        # ... and resumes to the end of the uninterrupted run, leaving no temporary file
        assert main([*argv, "--out", str(out), "--resume"]) == 0, epochs[chosen][k]
        same(tmp_path / "whole", out)
        assert not list(out.glob(".*.tmp"))


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_same_seed_same_metrics(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("a", "b"):
        subprocess.run(_train_cmd(data, tmp_path / name, 1), check=True, env=env, capture_output=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]
    a = strip(csv.DictReader(open(tmp_path / "a/metrics.csv")))
    b = strip(csv.DictReader(open(tmp_path / "b/metrics.csv")))
    assert a == b


def test_pickle_payloads_are_refused(run, tmp_path):
    from zoomnet.checkpoint import load_checkpoint, load_tensors_only

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    evil = tmp_path / "model.safetensors"
    torch.save({"weights": Payload()}, evil)
    (tmp_path / "model.json").write_text((run / "last.json").read_text())
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(evil)
    with pytest.raises(UserError, match="refused"):
        load_tensors_only(evil)


def test_resume_refuses_a_pickled_optimizer_state(data, run, tmp_path, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"optimizer": Payload()}, copy / "last.optim.pt")
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--out", str(copy), "--resume", "--epochs", "2", "--quiet"])
    assert code == 2 and "refused" in capsys.readouterr().err


def test_resume_refuses_an_optimizer_state_of_another_epoch(data, run, tmp_path, capsys):
    """The resume state is matched to the checkpoint's epoch; one of another epoch is refused."""
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    state = torch.load(copy / "last.optim.pt", weights_only=True)
    torch.save({**state, "epoch": 7}, copy / "last.optim.pt")
    (copy / "prev.optim.pt").unlink(missing_ok=True)
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--out", str(copy), "--resume", "--epochs", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no optimiser state of epoch 1" in err and "last.optim.pt: epoch 7" in err


VALID_PNG = png_bytes(RGB[:64, :64])
VALID_TIFF = tiff_bytes(RGB[:64, :64])


def tiled_jpeg_tiff() -> bytes:
    """A small JPEG-tiled pyramid, so that fuzzing reaches the native codecs too."""
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(RGB[:64, :64], tile=(16, 16), compression="jpeg", photometric="rgb", subifds=1)
        tw.write(RGB[:32:2, :32:2], tile=(16, 16), compression="jpeg", photometric="rgb", subfiletype=1)
    return buf.getvalue()


VALID_JPEG_TIFF = tiled_jpeg_tiff()


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


def test_softmax_and_pooling_stable_for_large_logits():
    from zoomnet.core.geometry import pool_to_grid, pooling_matrix
    from zoomnet.core.sampling import smoothed_log_softmax

    logits = torch.tensor([[[1e4, -1e4], [3e3, 0.0]]])
    rows, cols = pooling_matrix((2, 2), (2, 4), (1.0, 2.0))
    cells = pool_to_grid(logits, rows, cols)
    assert torch.isfinite(cells).all()
    assert torch.isfinite(smoothed_log_softmax(cells, 0.05)).all()


def test_estimator_stays_float32_under_autocast():
    from zoomnet import ArraySource, LevelConfig, ModelConfig, ZoomIn

    model = ZoomIn(ModelConfig(levels=[LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8, 8))], samples=4))
    src = ArraySource(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([src], contrastive=True, generator=torch.Generator().manual_seed(0))
    assert out.log_maps[0][0].dtype == torch.float32 and out.log_maps[1][0].dtype == torch.float32
    assert out.z.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_a_training_step_under_autocast_takes_its_loss_outside_it():
    # as train_epoch does on CUDA: the forward under bfloat16 autocast, the loss (which runs
    # the classifier on the sub-tiles' features for the instance term) after it
    from zoomnet import ArraySource, LevelConfig, ModelConfig, ZoomIn
    from zoomnet.config import TrainConfig
    from zoomnet.data.examples import Example
    from zoomnet.train import training_loss

    model = ZoomIn(ModelConfig(levels=[LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8, 8))], samples=4))
    rng = np.random.default_rng(0)
    batch = [Example(ArraySource(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), y, None, f"i{y}") for y in (0, 1)]
    cfg = TrainConfig(instance_weight=1.0, distill_weight=1.0, reference_class=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([e.source for e in batch], contrastive=True, generator=torch.Generator().manual_seed(0))
    assert out.leaf_features.dtype == torch.float32
    loss, terms = training_loss(model, out, batch, torch.tensor([0, 1]), cfg, True)
    loss.backward()
    assert torch.isfinite(loss) and terms["instance"] > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.feature.parameters())



def test_zero_epochs_on_the_command_line_is_refused(data, tmp_path, capsys):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--out", str(tmp_path / "r"), "--quiet", "--epochs", "0"]
    assert main(argv) == 2 and "--epochs 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_repeated_set_keeps_every_value(data, tmp_path):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--out", str(tmp_path / "r"), "--quiet", "--set", "train.lr=0.002", "--set", "model.samples=3"]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "r/config.json").read_text())
    assert saved["train"]["lr"] == 0.002 and saved["model"]["samples"] == 3


def test_a_run_folder_is_never_overwritten_without_resume_or_force(data, tmp_path, capsys):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--quiet"]
    run = tmp_path / "r"
    assert main([*argv, "--out", str(run)]) == 0
    before = (run / "last.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--out", str(run), "--set", "train.lr=0.01"]) == 2
    assert "holds a run already; continue it with --resume, or start afresh with --force" in capsys.readouterr().err
    assert (run / "last.safetensors").read_bytes() == before
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\ngone.png,a\n")
    assert main(["train", "--config", str(data / "tiny.json"), "--train", str(bad), "--quiet", "--out", str(run),
                 "--force"]) == 2
    assert (run / "last.safetensors").read_bytes() == before  # a failed --force loses nothing
    assert main([*argv, "--out", str(run), "--force", "--seed", "5"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 5
    # a folder with a user's files (the manifest itself, say) is refused even with --force
    user = tmp_path / "mine"
    user.mkdir()
    (user / "train.csv").write_text("path,label\n")
    capsys.readouterr()
    assert main([*argv, "--out", str(user), "--force"]) == 2
    assert "not a run's (train.csv)" in capsys.readouterr().err
    assert (user / "train.csv").read_text() == "path,label\n" and len(list(user.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    assert main([*argv, "--out", str(tmp_path / "file")]) == 2
    assert "a file, not a folder" in capsys.readouterr().err


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


def test_resume_refuses_settings_that_differ_from_the_run(data, tmp_path, capsys):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--quiet",
            "--out", str(tmp_path / "r"), "--set", "model.train_samples=8"]
    assert main(argv) == 0
    before = (tmp_path / "r/last.safetensors").read_bytes()
    for extra, field in ((["--set", "model.train_samples=16"], "model.train_samples"), (["--seed", "7"], "train.seed"),
                         (["--set", "train.lr=0.5"], "train.lr")):
        capsys.readouterr()
        assert main([*argv, "--resume", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{field} differs from the run's" in err, err
    assert (tmp_path / "r/last.safetensors").read_bytes() == before
    assert main([*argv, "--resume", "--epochs", "2"]) == 0  # the same settings, more epochs


def test_a_hand_edited_config_json_is_checked_against_the_checkpoint(run, data, tmp_path, capsys):
    import shutil

    image = str(data / "set/images/tiny_00000.png")
    saved = json.loads((run / "config.json").read_text())
    edits = {
        "not JSON": ("{model: oops", "not valid JSON"),
        "a list": ("[1, 2]", "holds a list, not a configuration"),
        "classes null": ({**saved, "data": {**saved["data"], "classes": None}}, "differ from the classes"),
        "classes swapped": ({**saved, "data": {**saved["data"], "classes": saved["data"]["classes"][::-1]}},
                            "differ from the classes"),
        "too many classes": ({**saved, "data": {**saved["data"], "classes": [*saved["data"]["classes"], "maybe"]}},
                             "differ from the classes"),
        "fill as a word": ({**saved, "data": {**saved["data"], "fill": "white"}}, "data.fill='white'"),
        "model a number": ({**saved, "model": 5}, "not a run configuration"),
    }
    for case, (content, needle) in edits.items():
        copy = tmp_path / case.replace(" ", "-")
        shutil.copytree(run, copy)
        (copy / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
        capsys.readouterr()
        assert main(["predict", str(copy), image]) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (case, err)


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


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    """`make-data colon-cancer colon-cancer` then `train --config colon-cancer`: the preset."""
    from zoomnet.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "colon-cancer").mkdir()
    assert load_config("colon-cancer").model.levels[1].region == (27, 27)
