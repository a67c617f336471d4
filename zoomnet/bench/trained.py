"""The bench's trained rows: each trainable model of a setting trained for several seeds on
the stand-in (through ``train_run``, the command line's training; runs reused when finished,
resumed when not), tested, and its cost measured with the seed-0 weights on test images."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from zoomnet.bench.measure import measure
from zoomnet.bench.settings import TRAINED, setting, setting_config
from zoomnet.data.generators import write_dataset
from zoomnet.data.manifest import load_examples
from zoomnet.evaluate import evaluate
from zoomnet.runs import load_run, train_run
from zoomnet.train import make_optimizer, train_epoch


def evaluate_trained(model: torch.nn.Module, examples, batch_size: int = 8, seed: int = 0) -> dict:
    """Accuracy, and where masks are known, the share of images with objects where a sampled
    sub-tile overlaps one (``images_hit``) and Spearman's rho between sampled sub-tiles'
    attention probability and object coverage (:func:`zoomnet.evaluate.evaluate`)."""
    res = evaluate(model, examples, batch_size, seed=seed, localization=True)
    row = {"accuracy": res["accuracy"]}
    if "auc" in res:
        row["auc"] = res["auc"]
    if res["images_with_objects"]:
        row.update(images_hit=res["images_hit"], spearman=res["spearman"])
    return row


def train_speed(model: torch.nn.Module, config, examples, batches: int = 4) -> float:
    """Training images per second of a copy of ``model``: one warm-up batch, then ``batches``
    timed batches of the last epoch's objective (the training step of ``train``)."""
    model = copy.deepcopy(model).train()
    cfg = copy.deepcopy(config.train)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(0)
    n = cfg.batch_size
    pool = examples * -(-n * (batches + 1) // max(len(examples), 1))  # repeated when the set is small
    train_epoch(model, pool[:n], cfg, optimizer, cfg.epochs, generator, progress=False)  # warm-up
    stats = train_epoch(model, pool[n : n * (batches + 1)], cfg, optimizer, cfg.epochs, generator, progress=False)
    return stats["images_per_s"]


def _train_one(name: str, kind: str, seed: int, data: Path, run: Path, overrides: list[str], epochs: int,
               progress: bool) -> None:
    """Train (or resume, or reuse when finished) one model of a setting into ``run``."""
    config = setting_config(name, kind, overrides)
    config.train.seed = seed
    config.train.epochs = epochs
    metrics = run / "metrics.csv"
    if metrics.is_file() and len(metrics.read_text().strip().splitlines()) - 1 >= epochs:
        return
    resume = (run / "last.safetensors").is_file()
    log = lambda msg: print(f"# {kind} seed {seed}: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    # the bench's own work folder: a run that died before its first epoch starts afresh
    train_run(config, data / "train.csv", data / "val.csv", run, resume=resume, device="cpu", log=log,
              progress=progress, epochs=epochs, force=not resume)


def _folders(name: str, work: Path, overrides: list[str], epochs: int | None, num: int | None,
             size: int | None) -> tuple[Path, Path]:
    """The data folder and the folder of the runs: ``work/data`` and ``work`` itself for the
    setting as defined, folders tagged by what differs otherwise."""
    s = setting(name)
    custom = (num or s.num, size or s.size) != (s.num, s.size)
    data = work / (f"data-{num or s.num}-{size or s.size}" if custom else "data")
    if not overrides and epochs in (None, s.epochs) and not custom:
        return data, work
    tag = hashlib.sha1(json.dumps([overrides, epochs or s.epochs, str(data)]).encode()).hexdigest()[:8]
    return data, work / tag


def _load_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB (a pyramidal TIFF: its level 0)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path, level=0)
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _seeds(name: str, kind: str, seeds: int, data: Path, runs: Path, overrides: list[str], epochs: int,
           progress: bool) -> tuple[list[dict], torch.nn.Module, object]:
    """Train and test one model for every seed; the test rows and the seed-0 model and config."""
    local, first = [], None
    for seed in range(seeds):
        run = runs / f"{kind}-seed{seed}"
        _train_one(name, kind, seed, data, run, overrides, epochs, progress)
        model, config = load_run(run, "cpu")
        test = load_examples(data / "test.csv", config.data.classes, config.data.fill, "evaluated")
        local.append(evaluate_trained(model, test, config.train.batch_size, seed=seed))
        first = first or (model, config)
    return local, *first


def _accuracy_columns(local: list[dict]) -> dict:
    accs = [r["accuracy"] for r in local]
    row = {"accuracy": round(statistics.mean(accs), 4),
           "accuracy_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else ""}
    if "auc" in local[0]:
        row["auc"] = round(statistics.mean(r["auc"] for r in local), 4)
    if "spearman" in local[0]:
        row["images_hit"] = round(statistics.mean(r["images_hit"] for r in local), 4)
        row["spearman"] = round(statistics.mean(r["spearman"] for r in local), 4)
    return row


def run_trained(name: str, models: list[str], seeds: int, work: Path, overrides: list[str], epochs: int | None,
                num: int | None, size: int | None, repeats: int, cost_images: int | None, progress: bool) -> list[dict]:
    """Train each trainable model for ``seeds`` seeds on the setting's synthetic set, test it,
    and measure the cost columns with the trained seed-0 weights on test images."""
    s = setting(name)
    epochs = epochs or s.epochs
    data, runs = _folders(name, work, overrides, epochs, num, size)
    if not (data / "test.csv").is_file():
        print(f"# writing the {s.data} set to {data}", file=sys.stderr)
        write_dataset(s.data, data, num=num or s.num, size=size or s.size, seed=0, progress=progress)
    with open(data / "test.csv", newline="") as fh:
        test_rows = list(csv.DictReader(fh))[: cost_images or s.cost_images]
    images = [_load_rgb(data / r["path"]) for r in test_rows]
    tested: dict[str, tuple] = {}  # ats-fullres is the ats models holding the image: tested once
    rows = []
    for kind in models:
        row = {"model": kind}
        source_kind = "ats" if kind == "ats-fullres" else kind
        trained = None  # the full-resolution CNN: cost only
        if source_kind in TRAINED:
            if source_kind not in tested:
                tested[source_kind] = _seeds(name, source_kind, seeds, data, runs, overrides, epochs, progress)
            local, trained, train_config = tested[source_kind]
            row.update(_accuracy_columns(local))
            if kind != "ats-fullres":
                train = load_examples(data / "train.csv", train_config.data.classes, train_config.data.fill, "training")
                row["train_images_per_s"] = round(train_speed(trained, train_config, train), 2)
        row.update(measure(name, kind, repeats, model=trained, images=images, overrides=overrides))
        rows.append(row)
    return rows
