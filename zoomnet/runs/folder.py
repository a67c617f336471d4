"""The run folder: what it holds, how it is started, checked and resumed.

A run folder holds everything needed to reproduce or use it:

    config.json          the resolved configuration, with the class list
    metrics.csv          one row per epoch: loss terms, accuracies, AUC, hit rates, speed
    last.safetensors     weights after the last finished epoch, with the config and the
                         training state in its metadata (+ last.json: a readable copy)
    last.optim.pt        optimiser, schedule and random state for resuming (tensors only)
    prev.optim.pt        the same of the epoch before (a crash between files resumes from it)
    best.safetensors     weights of the best validation epoch (+ best.json; :func:`epoch_score`)

Every file is written to a temporary name and renamed into place, in an order that lets a
resumed run reach the same end from a crash at any instant (``runs.training``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from zoomnet.checkpoint import atomic_write_bytes, load_tensors_only
from zoomnet.config import RunConfig, config_from_dict, with_legacy_fields
from zoomnet.errors import FORCE, OUT, RESUME, UserError

LOCK = ".lock"  # held by the process that trains into the folder (released when it ends, however it ends)
RUN_FILES = {"config.json", "metrics.csv", "last.safetensors", "last.json", "last.optim.pt", "prev.optim.pt",
             "best.safetensors", "best.json", "tensorboard", LOCK}


def prepare_run_folder(out: Path, force: bool, remove: bool = True) -> None:
    """Make sure a new run may write into ``out``: absent or empty, or (with ``force``)
    holding only a run's own files, which are removed. Anything else is refused, so a run
    never overwrites another run's checkpoints, a manifest or any other file of the user's.

    With ``remove`` False it only checks (the old run stays until the new one is ready to
    write, so a bad manifest found in between loses nothing).

    Raises:
        UserError: ``out`` is a file, holds a run (without ``force``), or holds other files.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: a file, not a folder; give a new {{out}} folder for the run", out=OUT)
    entries = sorted(e for e in out.iterdir() if e.name != LOCK)  # the lock alone is no run
    if not entries:
        return
    foreign = [e.name for e in entries if e.name not in RUN_FILES and not (e.name.startswith(".") and e.name.endswith(".tmp"))]
    if foreign:
        raise UserError(
            f"{out}: holds files that are not a run's ({', '.join(foreign[:3])}); give a new {{out}} folder "
            "(a run never writes over other files)", out=OUT,
        )
    if not force:
        raise UserError(f"{out}: holds a run already; continue it with {{resume}}, or start afresh with {{force}}",
                        resume=RESUME, force=FORCE)
    if remove:
        for e in entries:
            if e.name != LOCK:  # the lock this process holds
                shutil.rmtree(e) if e.is_dir() else e.unlink()


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock while a run trains into it: a second process is refused, and a
    killed one leaves no stale lock (the system releases it with the process).

    Raises:
        UserError: another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{out}: another process is training into this folder; wait for it to end, or give "
                            "another {out}", out=OUT) from None
        yield
    finally:
        fh.close()  # closing releases the lock


def write_metrics(path: Path, history: list[dict]) -> None:
    """``metrics.csv``: one row per epoch, every column any epoch has."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in history:
        # an undefined figure (a hit rate without masks) is an empty cell
        writer.writerow({k: (("" if not math.isfinite(v) else f"{v:.6g}") if isinstance(v, float) else v)
                         for k, v in row.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def save_resume_state(out: Path, optimizer, scheduler, generator: torch.Generator, epoch: int) -> None:
    """Write ``last.optim.pt`` for the end of ``epoch``, keeping the previous one as
    ``prev.optim.pt``: whatever instant a crash comes, the state of the epoch that
    ``last.safetensors`` holds is in one of the two (:func:`load_resume_state`)."""
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


def load_resume_state(out: Path, epoch: int) -> dict:
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
        "train a new run ({force}), or copy the run's best.safetensors elsewhere first", force=FORCE,
    )


def config_field(config: RunConfig, dotted: str):
    """The value of a dotted field (``train.lr``) of a configuration."""
    node = config.to_dict()
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def first_difference(given: dict, saved: dict, where: str = "") -> str | None:
    """The dotted name of the first field where two configurations differ, leaving out what
    a run fills in itself (the class list, the reference class, the class count), the
    epochs (which a resumed run may change), and fields the saved configuration does not
    record (they came later: the run keeps what it was trained with).

    >>> first_difference({"train": {"lr": 0.1, "epochs": 3}}, {"train": {"lr": 0.2, "epochs": 9}})
    'train.lr'
    """
    derived = {"data.classes", "data.reference_class", "train.reference_class", "train.reference_share",
               "model.num_classes", "train.epochs"}
    for key in sorted(saved):
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


def read_run_config(path: Path) -> RunConfig:
    """A run's ``config.json``, checked, its model fields completed as an earlier release
    trained them (``with_legacy_fields``): a file edited into something else gets one line.

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


def epoch_score(row: dict) -> tuple[float, float]:
    """How an epoch ranks for ``best.safetensors`` (higher is better; the first of equals wins):
    validation accuracy, ties broken by the lower validation loss (a small validation set
    ties early, while the model still improves). Without a validation set, training
    accuracy."""
    if "val_accuracy" in row:
        return (row["val_accuracy"], -row.get("val_loss", math.inf))
    return (row["train_accuracy"], -math.inf)


def summary(out: Path, history: list[dict], val_csv) -> str:
    """What a finished run says: where it is, its best epoch, and what to type next."""
    import shlex

    best = max(history, key=epoch_score)
    shown = "  ".join(f"{k.replace('_', ' ')} {best[k]:.3f}" for k in ("val_accuracy", "val_auc",
                      "val_balanced_accuracy", "val_loss", "train_accuracy") if k in best)
    beside = Path(val_csv).with_name("test.csv") if val_csv else None
    test = shlex.quote(str(beside)) if beside is not None and beside.is_file() else "TEST.csv"
    run = shlex.quote(str(out))
    return (
        f"run: {out} (best.safetensors from epoch {best['epoch']}: {shown}; metrics.csv per epoch)\n"
        f"next: zoomnet evaluate {run} {test}\n"
        f"      zoomnet predict {run} IMAGES_OR_FOLDERS --out predictions.csv --heatmaps {shlex.quote(str(out / 'heatmaps'))}"
    )
