"""The command line, in-process (``main(argv)``) on tiny generated data."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import json
from pathlib import Path

import pytest
import torch

from zoomnet.cli import main
from zoomnet.errors import UserError

def test_make_data_writes_manifests(data):
    for split in ("train", "val", "test"):
        rows = list(csv.DictReader(open(data / "set" / f"{split}.csv")))
        assert rows and set(rows[0]) == {"path", "label", "mask"}
        assert (data / "set" / rows[0]["path"]).is_file() and (data / "set" / rows[0]["mask"]).is_file()


def test_train_writes_the_run_folder(run):
    for name in ("config.json", "metrics.csv", "last.safetensors", "last.json", "best.safetensors", "last.optim.pt"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["classes"] == ["negative", "positive"]
    assert cfg["data"]["reference_class"] == "negative"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 1
    for key in ("loss_ce", "loss_contrastive", "train_accuracy", "val_accuracy", "val_auc", "seconds", "images_per_s"):
        assert key in rows[0], key


def test_resume_continues_the_run(data, run, tmp_path):
    copy = _copy_run(run, tmp_path / "run")
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--val", str(data / "set/val.csv"), "--out", str(copy), "--epochs", "2", "--resume", "--quiet"])
    assert code == 0
    assert [r["epoch"] for r in csv.DictReader(open(copy / "metrics.csv"))] == ["1", "2"]
    assert json.loads((copy / "last.json").read_text())["state"]["epoch"] == 2


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
    for args in (["--deterministic"], ["--deterministic"], ["--seed", "3"], ["--seed", "3"]):
        main(["predict", str(run), image, *args])
        outs.append(json.loads(capsys.readouterr().out.strip())["probabilities"])
    assert outs[0] == outs[1] and outs[2] == outs[3]


def _copy_run(run: Path, to: Path) -> Path:
    """A copy of the session's trained run that a test may change."""
    to.mkdir()
    for f in run.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


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
    }


@pytest.mark.parametrize("case", [
    "missing csv", "misnamed column", "empty csv", "unknown val label", "missing image", "unknown preset",
    "unknown field", "impossible setting", "resume without checkpoint", "no such run",
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


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, run, tmp_path, monkeypatch):
    import zoomnet.train as train_mod
    from zoomnet.config import load_config
    from zoomnet.runs import train_run

    copy = _copy_run(run, tmp_path / "run")
    before = (copy / "last.safetensors").read_bytes()
    real = train_mod.training_loss

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        return loss * float("nan"), terms

    monkeypatch.setattr(train_mod, "training_loss", poisoned)
    config = load_config(str(data / "tiny.json"))
    with pytest.raises(UserError, match="loss is nan.*last good checkpoint"):
        train_run(config, data / "set/train.csv", None, copy, resume=True, progress=False, log=lambda s: None,
                  epochs=2)
    assert (copy / "last.safetensors").read_bytes() == before


def _ddp_worker(rank: int, world: int, root: str, port: int) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from zoomnet.config import load_config
    from zoomnet.data.manifest import load_examples
    from zoomnet.model import build_model
    from zoomnet.train import make_optimizer, train_epoch

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = load_config(str(Path(root) / "tiny.json"))
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts them)
    model = build_model(config.model)
    wrapped = DistributedDataParallel(model)
    examples = load_examples(Path(root) / "set/train.csv", ["negative", "positive"])
    optimizer = make_optimizer(model, config.train)
    generator = torch.Generator().manual_seed(rank)  # different data and draws per rank
    train_epoch(wrapped, examples, config.train, optimizer, 1, generator, progress=False, rank=rank, world=world)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(root) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_ddp_two_cpu_processes_keep_identical_weights(data):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, str(data), port), nprocs=2, join=True)
    a = torch.load(data / "rank0.pt", weights_only=True)
    b = torch.load(data / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    from zoomnet.config import load_config
    from zoomnet.model import build_model

    initial = build_model(load_config(str(data / "tiny.json")).model).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # identical on both ranks ...
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # ... and trained


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


def test_the_best_epoch_breaks_ties_of_validation_accuracy_by_validation_loss():
    from zoomnet.runs import epoch_score

    rows = [{"epoch": 1, "val_accuracy": 1.0, "val_loss": 0.6, "train_accuracy": 0.6},
            {"epoch": 2, "val_accuracy": 1.0, "val_loss": 0.05, "train_accuracy": 1.0},
            {"epoch": 3, "val_accuracy": 0.75, "val_loss": 0.01, "train_accuracy": 1.0}]
    assert max(rows, key=epoch_score)["epoch"] == 2
    older = [{k: v for k, v in r.items() if k != "val_loss"} for r in rows]  # runs from before the loss was kept
    assert max(older, key=epoch_score)["epoch"] == 1
    no_val = [{"epoch": 1, "train_accuracy": 0.9}, {"epoch": 2, "train_accuracy": 0.9}, {"epoch": 3, "train_accuracy": 0.8}]
    assert max(no_val, key=epoch_score)["epoch"] == 1


def test_train_ends_with_the_run_the_best_epoch_and_what_to_type_next(data, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--val", str(data / "set/val.csv"), "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"run: {out} (best.safetensors from epoch 1: val accuracy" in text
    assert f"next: zoomnet evaluate {out} {data / 'set/test.csv'}" in text and "zoomnet predict" in text
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert all(0.0 <= float(r["val_loss"]) < 50 for r in rows)  # the tie-break of best.safetensors
    # TensorBoard is an extra: logged where it is installed, a one-line hint where it is not
    import importlib.util

    code = main([*argv[:-5], "--out", str(tmp_path / "tb"), "--quiet", "--tensorboard"])
    if importlib.util.find_spec("tensorboard") is None:
        assert code == 2 and "pip install tensorboard" in capsys.readouterr().err
    else:
        assert code == 0 and list((tmp_path / "tb/tensorboard").glob("events.*"))


NET_MODULE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, in_channels=3, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.out_dim = width

    def forward(self, x):
        return torch.nn.functional.normalize(self.conv(x).amax(dim=(2, 3)), dim=1)


def tiny_net(in_channels=3, width=4):
    return Tiny(in_channels, width)
'''


def test_a_feature_net_from_a_users_module_trains_and_predicts_in_a_fresh_process(data, tmp_path):
    (tmp_path / "lab_nets.py").write_text(NET_MODULE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = tmp_path / "run"
    train = [sys.executable, "-m", "zoomnet", "train", "--config", str(data / "tiny.json"), "--train",
             str(data / "set/train.csv"), "--out", str(run), "--quiet", "--device", "cpu",
             "--set", "model.feature=lab_nets:tiny_net", 'model.feature_kwargs={"width": 6}']
    done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "config.json").read_text())["model"]["feature"] == "lab_nets:tiny_net"
    image = str(data / "set/images/tiny_00000.png")
    done = subprocess.run([sys.executable, "-m", "zoomnet", "predict", str(run), image], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["path"] == image
    # without the module on the path: one line that says how to fix it
    env.pop("PYTHONPATH")
    done = subprocess.run([sys.executable, "-m", "zoomnet", "predict", str(run), image], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path.parent)
    assert done.returncode == 2 and "lab_nets:tiny_net" in done.stderr and "PYTHONPATH" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_evaluate_prints_strict_json_when_a_metric_is_undefined(data, run, tmp_path, capsys):
    rows = list(csv.DictReader(open(data / "set/test.csv")))
    one_class = [r for r in rows if r["label"] == rows[0]["label"]]
    path = write_csv(tmp_path / "one.csv", ["path", "label"],
                     [[str(data / "set" / r["path"]), r["label"]] for r in one_class])
    assert main(["evaluate", str(run), str(path), "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NaN" not in last and json.loads(last)["auc"] is None  # AUC of one class: undefined


def test_exploding_gradients_stop_the_run_and_non_finite_weights_are_never_saved(data, run, tmp_path, monkeypatch):
    import zoomnet.train as train_mod
    from zoomnet.checkpoint import save_checkpoint
    from zoomnet.config import load_config
    from zoomnet.runs import load_run, train_run

    copy = _copy_run(run, tmp_path / "run")
    before = (copy / "best.safetensors").read_bytes()
    real = train_mod.training_loss

    class Blow(torch.autograd.Function):  # the value passes, the gradient becomes infinite
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    def exploding(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        return Blow.apply(loss), terms

    monkeypatch.setattr(train_mod, "training_loss", exploding)
    with pytest.raises(UserError, match="gradients are not finite.*epoch 2.*last good checkpoint"):
        train_run(load_config(str(data / "tiny.json")), data / "set/train.csv", None, copy, resume=True,
                  progress=False, log=lambda s: None, epochs=2)
    assert (copy / "best.safetensors").read_bytes() == before
    model, _ = load_run(copy)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        save_checkpoint(model, copy / "best.safetensors")
    assert (copy / "best.safetensors").read_bytes() == before
