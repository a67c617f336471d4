"""The wheel as a user gets it: built, installed into a fresh virtual environment outside
the repository (beside a CPU torch), and used from a preset. Slow: it installs packages."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, timeout: int = 900) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_wheel_installs_and_trains_from_a_preset(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp_path / "dist", ROOT], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("zoomnet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "zoomnet/config/presets/tiny-objects.json" in names and "zoomnet/config/presets/megapixel-mnist.json" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    python = venv / "bin" / "python"
    # the CPU build first, as the README's Install section says
    _run([python, "-m", "pip", "install", "--quiet", "torch==2.13.0"], tmp_path)
    _run([python, "-m", "pip", "install", "--quiet", wheel], tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    zoomnet = venv / "bin" / "zoomnet"
    doctor = _run([zoomnet, "doctor"], work)
    assert "tiny-objects" in doctor and "megapixel-mnist" in doctor
    _run([zoomnet, "make-data", "tiny-objects", "set", "--num", "12", "--size", "256"], work)
    out = _run([zoomnet, "train", "--config", "tiny-objects", "--train", "set/train.csv", "--out", "run",
                "--epochs", "1", "--quiet", "--set", "model.train_samples=8", "train.batch_size=4"], work)
    assert (work / "run" / "best.safetensors").is_file(), out
    predicted = _run([zoomnet, "predict", "run", "set/images/tiny_00000.png"], work)
    assert '"label"' in predicted
