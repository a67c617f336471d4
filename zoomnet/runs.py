"""Runs on disk: train from manifests into a run folder, resume, evaluate, predict.

A run folder holds everything needed to reproduce or use it:

    config.json          the resolved configuration, with the class list
    metrics.csv          one row per epoch: loss terms, accuracies, AUC, hit rates, speed
    last.safetensors     weights after the last finished epoch, with the config and the
                         training state in its metadata (+ last.json: a readable copy)
    last.optim.pt        optimiser, schedule and random state for --resume (tensors only)
    prev.optim.pt        the same of the epoch before (a crash between files resumes from it)
    best.safetensors     weights of the best validation epoch (+ best.json; :func:`epoch_score`)

Every file is written to a temporary name and renamed into place, in an order that lets
``--resume`` reach the same end from a crash at any instant (see the end of an epoch in
:func:`train_run`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from zoomnet.metrics import classification_metrics
from zoomnet.checkpoint import (
    atomic_write_bytes, load_checkpoint, load_tensors_only, refresh_readable_copy, save_checkpoint,
)
from zoomnet.config import RunConfig, config_from_dict
from zoomnet.data.manifest import class_list, load_examples, read_manifest, resolve_reference
from zoomnet.data.examples import Example
from zoomnet.errors import ImageError, UserError
from zoomnet.model import build_model, with_legacy_fields
from zoomnet.train import NonFiniteLoss, evaluate, fit, make_optimizer


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose cpu, cuda or auto")
    return torch.device(name)


def _write_metrics(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def _save_resume_state(out: Path, optimizer, scheduler, generator: torch.Generator, epoch: int) -> None:
    """Write ``last.optim.pt`` for the end of ``epoch``, keeping the previous one as
    ``prev.optim.pt``: whatever instant a crash comes, the state of the epoch that
    ``last.safetensors`` holds is in one of the two (:func:`_load_resume_state`)."""
    state = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler else {},
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    if (out / "last.optim.pt").exists():
        os.replace(out / "last.optim.pt", out / "prev.optim.pt")
    atomic_write_bytes(out / "last.optim.pt", buf.getvalue())


def _load_resume_state(out: Path, epoch: int) -> dict:
    """The optimiser, schedule and random state saved with the weights of ``epoch``, on the CPU:
    the random states must stay there, and the optimiser moves its state to its parameters'
    device when it loads it.

    Raises:
        UserError: neither ``last.optim.pt`` nor ``prev.optim.pt`` is of that epoch.
    """
    found = []
    for name in ("last.optim.pt", "prev.optim.pt"):
        if (out / name).is_file():
            state = load_tensors_only(out / name)
            found.append(f"{name}: epoch {state.get('epoch', '?')}")
            if state.get("epoch", epoch) == epoch:  # files from before the epoch was recorded: trusted
                return state
    raise UserError(
        f"{out}: no optimiser state of epoch {epoch}, the epoch of last.safetensors ({'; '.join(found) or 'none found'}); "
        "train a new run (--force), or copy the run's best.safetensors elsewhere first"
    )


def _distributed() -> tuple[int, int]:
    """``(rank, world size)`` when launched by torchrun, else ``(0, 1)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


RUN_FILES = {"config.json", "metrics.csv", "last.safetensors", "last.json", "last.optim.pt", "prev.optim.pt", "best.safetensors",
             "best.json", "tensorboard"}


def prepare_run_folder(out: Path, force: bool, remove: bool = True) -> None:
    """Make sure a new run may write into ``out``: absent or empty, or (with ``force``)
    holding only a run's own files, which are removed. Anything else is refused, so a run
    never overwrites another run's checkpoints, a manifest or any other file of the user's.

    Raises:
        UserError: ``out`` is a file, holds a run (without ``force``), or holds other files.

    With ``remove`` False it only checks (the old run stays until the new one is ready to
    write, so a bad manifest found in between loses nothing).
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: a file, not a folder; give a new --out folder for the run")
    entries = sorted(out.iterdir())
    if not entries:
        return
    foreign = [e.name for e in entries if e.name not in RUN_FILES and not (e.name.startswith(".") and e.name.endswith(".tmp"))]
    if foreign:
        raise UserError(
            f"{out}: holds files that are not a run's ({', '.join(foreign[:3])}); give a new --out folder "
            "(a run never writes over other files)"
        )
    if not force:
        raise UserError(f"{out}: holds a run already; continue it with --resume, or start afresh with --force")
    if not remove:
        return
    import shutil

    for e in entries:
        shutil.rmtree(e) if e.is_dir() else e.unlink()


def _field(config: RunConfig, dotted: str):
    node = config.to_dict()
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def first_difference(given: dict, saved: dict, where: str = "") -> str | None:
    """The dotted name of the first field where two configurations differ, leaving out what
    a run fills in itself (the class list, the reference class, the class count) and the
    epochs, which ``--resume --epochs`` may change.

    >>> first_difference({"train": {"lr": 0.1, "epochs": 3}}, {"train": {"lr": 0.2, "epochs": 9}})
    'train.lr'
    """
    derived = {"data.classes", "data.reference_class", "train.reference_class", "train.reference_share",
               "model.num_classes", "train.epochs"}
    for key in sorted(saved):  # a field the run does not record came later: the run keeps what it had
        name = f"{where}.{key}" if where else key
        if name in derived:
            continue
        a, b = given.get(key), saved.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, name)
            if found:
                return found
        elif a != b and not (name == "data.reference_class" and None in (a, b)):
            return name
    return None


def check_image_sizes(examples, model_config, where: str) -> None:
    """Refuse images smaller than one sub-tile: there is nothing to zoom into.

    Raises:
        ImageError: naming the first such image and the fix.
    """
    if model_config.kind == "cnn":
        return
    need_h, need_w = model_config.levels[-1].region
    for ex in examples:
        if ex.source.height < need_h or ex.source.width < need_w:
            raise ImageError(
                f"{ex.name}: {ex.source.height}x{ex.source.width} is smaller than one sub-tile "
                f"({need_h}x{need_w}) of {where}; use larger images or a config with smaller regions"
            )


def train_run(
    config: RunConfig,
    train_csv: str | Path,
    val_csv: str | Path | None,
    out_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    log: Callable[[str], None] = print,
    progress: bool = True,
    epochs: int | None = None,
    tensorboard: bool = False,
    force: bool = False,
) -> list[dict]:
    """Train a model on the manifests, writing the run folder; returns the epoch rows.

    With ``resume``, the run's saved configuration is used; ``epochs`` (if given) extends
    or shortens it; otherwise ``out_dir`` must be new or empty (``force``: a previous
    run's files in it are removed first). ``tensorboard`` also logs every epoch's metrics
    and a heatmap of a validation image to ``out_dir/tensorboard`` (needs the
    ``tensorboard`` package).
    """
    out = Path(out_dir)
    rank, world = _distributed()
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)

    history: list[dict] = []
    start_epoch = 1
    best = (-math.inf, -math.inf)
    if not resume and rank == 0:
        prepare_run_folder(out, force, remove=False)
    if resume:
        if not (out / "last.safetensors").is_file() or not (out / "config.json").is_file():
            raise UserError(f"{out}: no checkpoint to resume from (last.safetensors); train without --resume first")
        saved = read_run_config(out / "config.json")
        differs = first_difference(config.to_dict(), json.loads((out / "config.json").read_text()))
        if differs:
            raise UserError(
                f"--resume {out}: {differs} differs from the run's ({_field(saved, differs)!r} in config.json, "
                f"{_field(config, differs)!r} given); resume with the run's --config, --set and --seed, or train "
                "a new run (--out elsewhere, or --force)"
            )
        config = saved
    if epochs is not None:
        if epochs < 1:
            raise UserError(f"--epochs {epochs}: give at least 1")
        config.train.epochs = epochs
    classes = config.data.classes
    if classes is None:
        classes = class_list(read_manifest(train_csv))
        config.data.classes = classes
    if len(classes) < 2:
        raise UserError(f"{train_csv}: only one class ({classes[0]}); a classifier needs at least two labels")
    config.model.num_classes = len(classes)
    ref = resolve_reference(classes, config.data.reference_class)
    config.data.reference_class = ref if ref is not None else "none"
    config.train.reference_class = classes.index(ref) if ref is not None else None
    if ref is None and config.model.kind != "cnn" and not resume:
        log(f"no reference (negative) class among {', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}: "
            "instance, distillation and contrastive terms in their multi-class form "
            "(--set data.reference_class=NAME names one)")

    data = config.data
    train = load_examples(train_csv, classes, data.fill, "training", data.target_mpp, data.max_pixels)
    val = load_examples(val_csv, classes, data.fill, "training", data.target_mpp, data.max_pixels) if val_csv else []
    check_image_sizes(train + val, config.model, "the model")
    if ref is not None and train:  # the instance loss weighs reference and object bags to halves
        config.train.reference_share = round(sum(e.label == config.train.reference_class for e in train) / len(train), 6)
    torch.manual_seed(config.train.seed)  # the initial weights follow the run's seed
    if resume:
        model, state = load_checkpoint(out / "last.safetensors", device=str(dev))
    else:
        try:
            model = build_model(config.model).to(dev)
        except (TypeError, ValueError) as exc:
            raise UserError(f"model: cannot build the model ({exc}); check model.feature_kwargs") from None
    optimizer = make_optimizer(model, config.train)
    scheduler = (
        torch.optim.lr_scheduler.StepLR(optimizer, config.train.lr_step, config.train.lr_gamma)
        if config.train.lr_step else None
    )
    generator = torch.Generator().manual_seed(config.train.seed + rank)
    if resume:
        resume_state = _load_resume_state(out, state["epoch"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler:
            scheduler.load_state_dict(resume_state["scheduler"])
        generator.set_state(resume_state["generator"])
        torch.set_rng_state(resume_state["torch_rng"])
        history = state.get("history", [])
        start_epoch = state["epoch"] + 1
        best = max((epoch_score(r) for r in history), default=best)
        log(f"resuming {out} after epoch {state['epoch']}")
        if rank == 0:  # a crash may have come between a checkpoint and its copy, or the metrics
            for stray in out.glob(".*.tmp"):  # what a killed process was writing
                stray.unlink(missing_ok=True)
            _write_metrics(out / "metrics.csv", history)
            for name in ("last.safetensors", "best.safetensors"):
                refresh_readable_copy(out / name)
    elif rank == 0:
        prepare_run_folder(out, force)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", json.dumps(config.to_dict(), indent=2).encode())

    class_weight = None
    if config.data.class_weights:
        counts = torch.bincount(torch.tensor([e.label for e in train]), minlength=len(classes)).float()
        class_weight = (counts.sum() / (len(classes) * counts.clamp_min(1))).to(dev)

    board = _tensorboard(out) if tensorboard and rank == 0 else None
    wrapped = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def save(epoch: int, row: dict) -> None:  # rank 0, after each epoch
        nonlocal best
        score = epoch_score(row)
        improved = score > best
        best = max(best, score)
        state = {"epoch": epoch, "history": history, "best": best[0], "classes": classes}
        # in this order, a crash at any instant resumes to the same end (tests/test_reliability.py):
        # the optimiser state first (the previous one kept), the best weights before the last ones
        # (a resumed epoch that improves rewrites them), the metrics last (rewritten on resume)
        _save_resume_state(out, optimizer, scheduler, generator, epoch)
        if improved:
            save_checkpoint(model, out / "best.safetensors", state)
        save_checkpoint(model, out / "last.safetensors", state)
        _write_metrics(out / "metrics.csv", history)
        if board is not None:
            _log_board(board, model, row, val[:2], epoch)

    try:
        fit(model, train, val, config.train, log=log, progress=progress, on_epoch=save, optimizer=optimizer,
            scheduler=scheduler, generator=generator, history=history, start_epoch=start_epoch, wrapped=wrapped,
            class_weight=class_weight, augment=config.data.augment_strength if config.data.augment else 0.0,
            rank=rank, world=world, autocast=dev.type == "cuda" and config.train.bf16)
    except NonFiniteLoss as exc:
        kept = f"the last good checkpoint is {out / 'last.safetensors'}" if (out / "last.safetensors").exists() else "no checkpoint was written yet"
        raise UserError(f"{exc}; training stopped ({kept}); lower train.lr or check the images") from None
    if board is not None:
        board.close()
    if rank == 0 and history:
        log(_summary(out, history, val_csv))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return history


def epoch_score(row: dict) -> tuple[float, float]:
    """How an epoch ranks for ``best.safetensors`` (higher is better; the first of equals wins):
    validation accuracy, ties broken by the lower validation loss. A small validation set ties
    early: 4 slides gave accuracy 1.0 from the second of 30 epochs, when the model was still
    at 0.64 on its training slides. Without a validation set, training accuracy."""
    if "val_accuracy" in row:
        return (row["val_accuracy"], -row.get("val_loss", math.inf))
    return (row["train_accuracy"], -math.inf)


def _summary(out: Path, history: list[dict], val_csv) -> str:
    """What a finished run says: where it is, its best epoch, and what to type next."""
    best = max(history, key=epoch_score)
    shown = "  ".join(f"{k.replace('_', ' ')} {best[k]:.3f}" for k in ("val_accuracy", "val_auc",
                      "val_balanced_accuracy", "val_loss", "train_accuracy") if k in best)
    beside = Path(val_csv).with_name("test.csv") if val_csv else None
    test = beside if beside is not None and beside.is_file() else "TEST.csv"
    return (
        f"run: {out} (best.safetensors from epoch {best['epoch']}: {shown}; metrics.csv per epoch)\n"
        f"next: zoomnet evaluate {out} {test}\n"
        f"      zoomnet predict {out} IMAGES_OR_FOLDERS --out predictions.csv --heatmaps {out / 'heatmaps'}"
    )


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard"))


def _log_board(board, model, row: dict, examples: list[Example], epoch: int) -> None:
    """Scalars of one epoch and heatmaps of a few validation images."""
    import numpy as np
    from PIL import Image

    from zoomnet.heatmap import render_batch

    for key, value in row.items():
        if isinstance(value, (int, float)) and key != "epoch" and math.isfinite(value):
            board.add_scalar(key, value, epoch)
    if examples and hasattr(model, "attention"):
        out = model.predict([e.source for e in examples[:1]], deterministic=True)
        with __import__("tempfile").TemporaryDirectory() as tmp:
            (path,) = render_batch(model, [examples[0].source], out, [Path(tmp) / "h.png"], [examples[0].name],
                                   display=512)
            board.add_image("heatmap", np.asarray(Image.open(path).convert("RGB")), epoch, dataformats="HWC")
    board.flush()


def read_run_config(path: Path) -> RunConfig:
    """A run's ``config.json``, checked: a file edited into something else gets one line.

    Raises:
        UserError: not JSON, not an object, or fields of the wrong type or range.
    """
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); restore the run's config.json") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a configuration; restore the run's config.json")
    if isinstance(data.get("model"), dict):
        data["model"] = with_legacy_fields(data["model"])
    try:
        return config_from_dict(data, str(path))
    except (TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a run configuration ({exc}); restore the run's config.json") from None


def load_run(run_dir: str | Path, device: str = "cpu", which: str = "best") -> tuple[torch.nn.Module, RunConfig]:
    """The model and configuration of a run folder (``best`` checkpoint, else ``last``)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run_dir}: no such run folder; give the --out folder of `zoomnet train`")
    path = run / f"{which}.safetensors"
    if not path.is_file():
        path = run / "last.safetensors"
    if not path.is_file() or not (run / "config.json").is_file():
        raise UserError(f"{run_dir}: no checkpoint in this folder; train a model into it first")
    config = read_run_config(run / "config.json")
    model, state = load_checkpoint(path, device=str(resolve_device(device)))
    trained = state.get("classes")
    if trained is not None and config.data.classes != trained:
        # the names in config.json label the outputs: an edit there would relabel every prediction
        raise UserError(
            f"{run / 'config.json'}: data.classes {config.data.classes} differ from the classes the checkpoint "
            f"was trained with ({', '.join(map(str, trained))}); restore data.classes in config.json"
        )
    return model.eval(), config


def evaluate_run(
    run_dir: str | Path, test_csv: str | Path, deterministic: bool = False, samples: int | None = None,
    seed: int = 0, device: str = "cpu", batch_size: int = 8, progress: bool = False,
) -> dict:
    """Metrics of a run on a manifest: accuracy, balanced accuracy, AUC (binary), confusion."""
    model, config = load_run(run_dir, device)
    classes = config.data.classes
    examples = load_examples(test_csv, classes, config.data.fill, "evaluated", config.data.target_mpp,
                             config.data.max_pixels)
    check_image_sizes(examples, config.model, f"the model in {run_dir}")
    res = evaluate(model, examples, batch_size, deterministic=deterministic, samples=samples, seed=seed,
                   progress=progress)
    metrics = {k: res[k] for k in ("accuracy", "balanced_accuracy", "confusion", "auc") if k in res}
    metrics.update(images=len(examples), classes=classes, hit_rate=res["hit_rate"], images_hit=res["images_hit"])
    return metrics


def probe_run(run_dir: str | Path, manifest: str | Path, per_image: int = 4, seed: int = 0,
              device: str = "cpu", progress: bool = False, which: str = "best") -> dict:
    """What a run's ``f`` and ``g`` (its ``best`` or ``last`` checkpoint) call single
    sub-tiles on and off the objects of a manifest with masks (:func:`zoomnet.probe.probe`)."""
    from zoomnet.model import ZoomIn
    from zoomnet.probe import probe

    model, config = load_run(run_dir, device, which)
    if not isinstance(model, ZoomIn):
        raise UserError(f"{run_dir}: a CNN run has no sub-tile classifier to probe; probe a zoomin or ats run")
    examples = load_examples(manifest, config.data.classes, config.data.fill, "probed", config.data.target_mpp,
                             config.data.max_pixels)
    if not any(e.mask is not None for e in examples):
        raise UserError(f"{manifest}: no image has a mask; the probe needs a 'mask' column (object pixels > 0)")
    check_image_sizes(examples, config.model, f"the model in {run_dir}")
    return probe(model, examples, config.data.classes, per_image, seed, progress)


def expand_inputs(inputs: list[str]) -> list[tuple[str, Path, str]]:
    """Images to predict, as ``(name as given, path, label or "")``: image files as they
    are, folders searched recursively for images and slides (by suffix, sorted), CSV
    manifests with a ``path`` column and optionally ``label``.

    Raises:
        UserError: an input that does not exist, or a folder without images.
    """
    from zoomnet.data.manifest import read_manifest
    from zoomnet.sources.open import PLAIN, TIFF
    from zoomnet.sources.slide import VENDOR

    known = PLAIN | TIFF | VENDOR
    out: list[tuple[str, Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in known)
            if not found:
                raise UserError(f"{item}: a folder with no images ({', '.join(sorted(known))}) in it or below")
            out += [(str(f), f, "") for f in found]
        elif path.suffix.lower() == ".csv":
            out += [(r.given, r.path, r.label) for r in read_manifest(path, labels=False)]
        else:
            out.append((item, path, ""))
    return out


def _output_name(given: str, taken: dict[str, str]) -> str:
    """A file stem for an image's heatmap and GeoJSON, unique within one prediction run
    (two ``slide.svs`` in different folders get ``slide`` and ``slide-<hash>``)."""
    import hashlib

    stem = Path(given).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(given).stem
    if taken.setdefault(stem, given) != given:
        stem = f"{stem}-{hashlib.sha1(given.encode()).hexdigest()[:8]}"
        taken[stem] = given
    return stem


def _done_paths(out_csv: Path, header: list[str]) -> set[str]:
    """Paths already in a predictions CSV written with ``header`` (for resuming)."""
    if not out_csv.is_file() or out_csv.stat().st_size == 0:
        return set()
    with out_csv.open(newline="") as fh:
        reader = csv.reader(fh)
        found = next(reader, [])
        if found != header:
            raise UserError(
                f"{out_csv}: exists with other columns ({', '.join(found[:6])}...); give a new --out, "
                "or delete it to start over"
            )
        return {row[0] for row in reader if len(row) == len(header)}


def predict_images(
    run_dir: str | Path, images: list[str], deterministic: bool = False, samples: int | None = None,
    seed: int = 0, device: str = "cpu", heatmaps: str | Path | None = None, geojson: str | Path | None = None,
    emit: Callable[[dict], None] | None = None, progress: bool = False, out_csv: str | Path | None = None,
    workers: int = 2, heatmap_size: int = 2048, attention_tiffs: str | Path | None = None,
) -> list[dict]:
    """Predict images, folders and manifests; one result dict per image (also passed to
    ``emit`` as it comes).

    With ``out_csv`` each result is appended to that CSV as soon as it is known, and images
    already in it are skipped, so a crashed or interrupted cohort resumes where it stopped.
    ``workers`` threads open the next files and read their level-1 views while the model
    works on the current one. A result's ``true_label`` is the manifest's label, if any.
    ``heatmaps`` pictures are at most ``heatmap_size`` px on the long side;
    ``attention_tiffs`` get a pyramidal TIFF of the attention at the file's level-0 size.

    Raises:
        UserError: an unreadable input (with one image), or an ``out_csv`` that is an input.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from zoomnet.data.manifest import LazyImage
    from zoomnet.export import geojson_of
    from zoomnet.heatmap import render_batch, write_attention_tiff
    from zoomnet.model import view_size

    model, config = load_run(run_dir, device)
    classes = config.data.classes
    items = expand_inputs(images)
    header = ["path", "true_label", "predicted", *[f"p_{c}" for c in classes], "seconds"]
    done: set[str] = set()
    if out_csv is not None:
        out_csv = Path(out_csv)
        if any(out_csv.resolve() == p.resolve() for _, p, _ in items) or any(
            Path(i).suffix.lower() == ".csv" and out_csv.resolve() == Path(i).resolve() for i in images
        ):
            raise UserError(f"--out {out_csv}: that is one of the inputs; write the predictions to a new file")
        done = _done_paths(out_csv, header)
        out_csv.parent.mkdir(parents=True, exist_ok=True)
    todo = [it for it in items if it[0] not in done]
    generator = torch.Generator().manual_seed(seed)
    strips = config.model.strip_rows

    def prepare(item):  # in a worker thread: open the file and read its level-1 view
        given, path, label = item
        src = LazyImage(path, given, config.data.fill, config.data.target_mpp, config.data.max_pixels)
        check_image_sizes([Example(src, 0, None, given)], config.model, f"the model in {run_dir}")
        views = None
        if config.model.kind != "cnn":
            vs = view_size(config.model.levels[0].scale, src.height, src.width)
            if not (strips and vs[0] > strips):  # huge views are read in strips by the model
                views = model.read_views([src])
        return src, views

    strides = [lv.cell_stride() for lv in config.model.levels]
    names: dict[str, str] = {}
    results, failed = [], []
    slowest = (0.0, "")
    fh = out_csv.open("a", newline="") if out_csv is not None else None
    try:
        writer = csv.writer(fh) if fh else None
        if writer and not done:
            writer.writerow(header)
            fh.flush()
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="predict", unit="image",
                   disable=not progress)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            ahead = workers + 1
            futures = [pool.submit(prepare, it) for it in todo[:ahead]]
            for k, item in enumerate(todo):
                given, _, label = item
                tick = time.perf_counter()
                try:
                    src, views = futures[k].result()
                except (ImageError, UserError) as exc:
                    if len(items) == 1:
                        raise
                    failed.append(given)
                    print(f"zoomnet: skipped {exc}", file=sys.stderr, flush=True)
                    bar.update(1)
                    continue
                finally:
                    if k + ahead < len(todo):
                        futures.append(pool.submit(prepare, todo[k + ahead]))
                    futures[k] = None  # let the finished image go
                out = model.predict([src], views=views, deterministic=deterministic, samples=samples,
                                    generator=generator)
                probs = torch.softmax(out.logits.float(), dim=1)[0].tolist()
                inner = src.opened()
                result = {
                    "path": given,
                    "label": classes[int(torch.tensor(probs).argmax())],
                    "probabilities": {c: p for c, p in zip(classes, probs)},
                    "seconds": time.perf_counter() - tick,
                    "pixels_read": getattr(inner, "pixels_decoded", src.height * src.width),
                    "bytes_read": getattr(inner, "bytes_read", 0),
                }
                if label:
                    result["true_label"] = label
                stem = _output_name(given, names)
                if heatmaps is not None and out.levels:
                    title = f"{given}: {result['label']} (p = {max(probs):.2f})"
                    (picture,) = render_batch(model, [src], out, [Path(heatmaps) / f"{stem}.png"], [title],
                                              display=heatmap_size)
                    result["heatmap"] = str(picture)
                if attention_tiffs is not None and out.levels:
                    target = Path(attention_tiffs) / f"{stem}.attention.tif"
                    result["attention_tiff"] = str(write_attention_tiff(src, out, 0, target, strides))
                if geojson is not None and out.levels:
                    Path(geojson).mkdir(parents=True, exist_ok=True)
                    target = Path(geojson) / f"{stem}.geojson"
                    collection = geojson_of(out, 0, src, classes, probs, strides, given)
                    atomic_write_bytes(target, json.dumps(collection).encode())
                    result["geojson"] = str(target)
                if writer:
                    writer.writerow([given, label, result["label"], *[f"{p:.6f}" for p in probs],
                                     f"{result['seconds']:.3f}"])
                    fh.flush()
                results.append(result)
                if emit:
                    emit(result)
                if result["seconds"] > slowest[0]:
                    slowest = (result["seconds"], Path(given).name)
                bar.set_postfix_str(f"slowest {slowest[1]} {slowest[0]:.1f}s", refresh=False)
                bar.update(1)
        bar.close()
    finally:
        if fh:
            fh.close()
    if failed:
        raise UserError(
            f"{len(failed)} of {len(items)} images could not be read (first: {failed[0]}); the others are "
            + (f"in {out_csv}; fix or remove those files and run the same command to finish" if out_csv else "above")
        )
    return results


def cohort_metrics(out_csv: Path, classes: list[str]) -> dict | None:
    """Metrics of a predictions CSV whose rows all carry a true label in ``classes``."""
    with Path(out_csv).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or any(r["true_label"] not in classes for r in rows):
        return None
    probs = torch.tensor([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    labels = torch.tensor([classes.index(r["true_label"]) for r in rows])
    return {"images": len(rows), **classification_metrics(probs, labels)}
