"""zoomnet.checkpoint: weights that load without running code, and checkpoints of earlier releases."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from zoomnet.checkpoint import load_checkpoint, save_checkpoint
from zoomnet.errors import UserError

from helpers import small_model


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


def test_checkpoint_round_trip(tmp_path):
    model, srcs = small_model()
    path = save_checkpoint(model, tmp_path / "run" / "model.safetensors", {"epoch": 3})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["state"] == {"epoch": 3}
    assert meta["model"]["levels"][1]["region"] == [8, 8]
    loaded, state = load_checkpoint(path)
    assert state == {"epoch": 3}
    a = model.predict(srcs, deterministic=True).logits
    b = loaded.predict(srcs, deterministic=True).logits
    assert torch.equal(a, b)
    assert not list((tmp_path / "run").glob("*.tmp"))  # no temporary files left behind


def test_a_checkpoint_from_before_the_contrast_prior_loads_without_one(tmp_path):
    import json

    from zoomnet.checkpoint import load_checkpoint, save_checkpoint
    from zoomnet.model import LevelConfig, ModelConfig, ZoomIn

    cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64)), LevelConfig(0.5, (16, 16), "dense")], attention_prior=0.0)
    model = ZoomIn(cfg)
    path = save_checkpoint(model, tmp_path / "old.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["model"]["attention_prior"]  # as written before the field existed
    path.with_suffix(".json").write_text(json.dumps(meta))
    loaded, _ = load_checkpoint(path)
    assert loaded.config.attention_prior == 0.0
    assert all(net.prior_gain is None for net in loaded.attention)


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(run, tmp_path, capsys):
    """Weights that hold NaN or Inf (a file damaged, or written by other code) are named at
    load, not met as a sampler's traceback."""
    from safetensors.torch import load_file, save_file

    from zoomnet.cli import main

    out = tmp_path / "run"
    shutil.copytree(run, out)
    for name in ("best.safetensors", "last.safetensors"):
        path = out / name
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(path))
        key = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[key][...] = float("nan")
        save_file(tensors, str(path), metadata=meta)
    assert main(["predict", str(out), str(run.parent / "set/images/tiny_00001.png"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "best.safetensors" in err and "NaN or infinite" in err
