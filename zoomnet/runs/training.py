"""``train_run``: train from manifests into a run folder, resume it, or run as one process of
several under torchrun (the folder's files: :mod:`zoomnet.runs.folder`)."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from zoomnet.checkpoint import (
    atomic_write_bytes, load_checkpoint, read_description, refresh_readable_copy, save_checkpoint,
)
from zoomnet.config import RunConfig
from zoomnet.data.examples import Example
from zoomnet.data.manifest import class_list, load_examples, read_manifest, resolve_reference
from zoomnet.errors import FORCE, OUT, RESUME, UserError, epochs_option
from zoomnet.draws import choose_train_samples
from zoomnet.model import ZoomIn, build_model
from zoomnet.nets.encoders import load_weights, record_encoder_input
from zoomnet.runtime.device import OUT_OF_MEMORY
from zoomnet.runs.folder import (
    config_field,
    epoch_score,
    first_difference,
    load_resume_state,
    prepare_run_folder,
    read_run_config,
    run_lock,
    save_resume_state,
    summary,
    write_metrics,
)
from zoomnet.runs.loading import check_image_sizes
from zoomnet.runtime import distributed
from zoomnet.runtime.allocator import reuse_freed_memory, settle_heap
from zoomnet.runtime.device import resolve_device
from zoomnet.runtime.files import writable_target
from zoomnet.train import NonFiniteLoss, fit, make_optimizer, make_scheduler


# fields a new run resolves and records: record_encoder_input, choose_train_samples
RESOLVED_AT_START = ("feature_size", "feature_mean", "feature_std", "train_samples")


def _resumed_config(config: RunConfig, out: Path) -> RunConfig:
    """The configuration a resumed run continues with: its own, when the given one asks for
    nothing else.

    Raises:
        UserError: no checkpoint to resume, or a field given otherwise than the run's.
    """
    if not (out / "last.safetensors").is_file() or not (out / "config.json").is_file():
        raise UserError(f"{out}: no checkpoint to resume from (last.safetensors); train without {{resume}} first",
                        resume=RESUME)
    saved = read_run_config(out / "config.json")
    recorded = json.loads((out / "config.json").read_text())
    given = config.to_dict()
    for name in RESOLVED_AT_START:  # unset (or "auto"): what the run resolved when it started
        if given["model"].get(name) in (None, "auto") and name in recorded.get("model", {}):
            given["model"][name] = recorded["model"][name]
    differs = first_difference(given, recorded)
    if differs:
        raise UserError(
            f"{{resume}} {out}: {differs} differs from the run's ({config_field(saved, differs)!r} in config.json, "
            f"{config_field(config, differs)!r} given); resume with the run's configuration, overrides and seed, "
            "or train a new run ({out} elsewhere, or {force})", resume=RESUME, out=OUT, force=FORCE,
        )
    return saved


def _classes(config: RunConfig, train_csv: str | Path, resume: bool, log: Callable[[str], None]) -> list[str]:
    """Fill in the class list (from the training manifest, unless the config has it), the
    class count and the reference class; return the class list."""
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
    if ref is None and config.model.kind in ("zoomin", "ats") and not resume:
        log(f"no reference (negative) class among {', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}: "
            "instance, distillation and contrastive terms in their multi-class form "
            "(the override data.reference_class=NAME names one)")
    return classes


@dataclass
class _State:
    """What a run trains with, new or resumed."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 1
    best: tuple[float, float] = (-math.inf, -math.inf)


def _start(config: RunConfig, out: Path, resume: bool, dev: torch.device, rank: int, log) -> _State:
    """A new model (from the run's seed), or the run's last checkpoint with its optimiser,
    schedule and random state."""
    torch.manual_seed(config.train.seed)  # the initial weights follow the run's seed
    if resume:
        model, saved = load_checkpoint(out / "last.safetensors", device=str(dev))
    else:
        model = _new_model(config, dev, rank, log)
    optimizer = make_optimizer(model, config.train)
    state = _State(model, optimizer, make_scheduler(optimizer, config.train),
                   torch.Generator().manual_seed(config.train.seed + rank))
    if not resume:
        return state
    resume_state = load_resume_state(out, saved["epoch"])
    optimizer.load_state_dict(resume_state["optimizer"])
    if state.scheduler:
        state.scheduler.load_state_dict(resume_state["scheduler"])
    state.generator.set_state(resume_state["generator"])
    torch.set_rng_state(resume_state["torch_rng"])
    state.history = saved.get("history", [])
    state.start_epoch = saved["epoch"] + 1
    state.best = max((epoch_score(r) for r in state.history), default=state.best)
    log(f"resuming {out} after epoch {saved['epoch']}")
    return state


def _new_model(config: RunConfig, dev: torch.device, rank: int, log) -> torch.nn.Module:
    """The model of a new run: built, its feature net's weights loaded from
    ``model.feature_weights``, and what that net is fed recorded in the configuration."""
    try:
        model = build_model(config.model)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model: cannot build the model ({exc}); check model.feature and model.feature_kwargs") from None
    if isinstance(model, ZoomIn):
        if config.model.feature_weights:
            try:
                said = load_weights(model.feature, config.model.feature_weights)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            if rank == 0:
                log(said)
        record_encoder_input(config.model, model.feature)
    return model.to(dev)


def _choose_samples(config: RunConfig, state: _State, train: list[Example], rank: int, log) -> None:
    """With ``model.train_samples: "auto"`` (a new run), the training N from the data,
    written into the configuration (config.json and the checkpoints record the number)."""
    if config.model.train_samples != "auto" or not isinstance(state.model, ZoomIn):
        return
    if rank == 0:
        log("choosing the training draws (model.train_samples=auto) ...")
    choice = choose_train_samples(state.model, train, config.train, log=log if rank == 0 else None)
    config.model.train_samples = choice.samples
    if rank == 0:
        log(choice.describe())


def _tidy_resumed(out: Path, history: list[dict]) -> None:
    """A crash may have come between a checkpoint and its copy, or the metrics: redo them."""
    for stray in out.glob(".*.tmp"):  # what a killed process was writing
        stray.unlink(missing_ok=True)
    write_metrics(out / "metrics.csv", history)
    for name in ("last.safetensors", "best.safetensors"):
        refresh_readable_copy(out / name)


def _examples(config: RunConfig, train_csv, val_csv, log) -> tuple[list[Example], list[Example]]:
    """The training and validation examples, checked; the reference class's share set."""
    data, classes = config.data, config.data.classes
    train = load_examples(train_csv, classes, data.fill, "training", data.target_mpp, data.max_pixels)
    val = load_examples(val_csv, classes, data.fill, "training", data.target_mpp, data.max_pixels) if val_csv else []
    shared = {_image_path(e) for e in train} & {_image_path(e) for e in val}
    if val and len(shared) >= len(val) / 2:
        log(f"warning: {val_csv} shares {len(shared)} of its {len(val)} images with {train_csv}: validation then "
            "measures what training saw, not what it learnt; give a manifest of held-out images")
    check_image_sizes(train + val, config.model, "the model")
    if config.train.reference_class is not None and train:  # the instance loss weighs reference and object bags
        share = sum(e.label == config.train.reference_class for e in train) / len(train)
        config.train.reference_share = round(share, 6)
    return train, val


def _image_path(example: Example) -> str:
    path = getattr(example.source, "path", None)
    return str(Path(path).resolve()) if path is not None else example.name


def _write_or_say(out: Path, write, what: str, done: int) -> None:
    """``write()``; a failed write (a full disk, a file-size limit, an I/O error) stops the
    run in one line: every file is replaced by a rename, so the last checkpoint is whole
    (epoch ``done``, or the epoch being written if its checkpoint got in before the failure)
    and the run resumes from it once the cause is fixed.

    Raises:
        UserError: naming the folder, the cause and what to do.
    """
    try:
        write()
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
        try:
            done = int(read_description(out / "last.safetensors")["state"]["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if done:
            raise UserError(f"{out}: cannot write {what} ({cause}); the last checkpoint, of epoch {done}, is whole: "
                            "fix the cause, then resume with {resume}", resume=RESUME) from None
        raise UserError(f"{out}: cannot write {what} ({cause}); no epoch had finished: fix the cause and train "
                        "again") from None


class _Saver:
    """Rank 0's end of an epoch: the optimiser state, the best and last checkpoints and the
    metrics, in an order such that a crash at any instant resumes to the same end (the
    optimiser state first, the previous one kept; the best weights before the last ones, as
    a resumed epoch that improves rewrites them; the metrics last, rewritten on resume)."""

    def __init__(self, out: Path, state: _State, classes: list[str], board=None, val: list[Example] = ()):
        self.out, self.state, self.classes, self.board, self.val = out, state, classes, board, list(val)

    def __call__(self, epoch: int, row: dict) -> None:
        _write_or_say(self.out, lambda: self._save(epoch, row), f"the end of epoch {epoch}", epoch - 1)

    def _save(self, epoch: int, row: dict) -> None:
        s = self.state
        score = epoch_score(row)
        improved = score > s.best
        s.best = max(s.best, score)
        meta = {"epoch": epoch, "history": s.history, "best": s.best[0], "classes": self.classes}
        save_resume_state(self.out, s.optimizer, s.scheduler, s.generator, epoch)
        if improved:
            save_checkpoint(s.model, self.out / "best.safetensors", meta)
        save_checkpoint(s.model, self.out / "last.safetensors", meta)
        write_metrics(self.out / "metrics.csv", s.history)
        if self.board is not None:
            from zoomnet.runs.board import log_epoch

            log_epoch(self.board, s.model, row, self.val[:2], epoch)


def train_run(
    config: RunConfig, train_csv: str | Path, val_csv: str | Path | None, out_dir: str | Path,
    resume: bool = False, device: str = "auto", log: Callable[[str], None] = print, progress: bool = True,
    epochs: int | None = None, tensorboard: bool = False, force: bool = False,
) -> list[dict]:
    """Train a model on the manifests, writing the run folder; returns the epoch rows.

    With ``resume``, the run's saved configuration is used; ``epochs`` (if given) extends
    or shortens it; otherwise ``out_dir`` must be new or empty (``force``: a previous
    run's files in it are removed first). ``tensorboard`` also logs every epoch's metrics
    and a heatmap of a validation image to ``out_dir/tensorboard`` (needs the
    ``tensorboard`` package).
    """
    settle_heap()
    reuse_freed_memory()  # where ZOOMNET_MALLOC=1 asks for it (zoomnet.runtime.allocator)
    out = Path(out_dir)
    rank, world = distributed.rank_and_world()
    dev = distributed.local_device(resolve_device(device), world)
    if resume:
        config = _resumed_config(config, out)
    elif rank == 0:
        prepare_run_folder(out, force, remove=False)
    if rank == 0:
        writable_target(out, OUT)  # before any work: a folder the run cannot write loses nothing
    if epochs is not None:
        if epochs < 1:
            raise UserError("{epochs}: give at least 1", epochs=epochs_option(epochs))
        config.train.epochs = epochs
    classes = _classes(config, train_csv, resume, log)
    train, val = _examples(config, train_csv, val_csv, log)
    state = _start(config, out, resume, dev, rank, log)  # before the folder is touched: a model that fails to build
    _choose_samples(config, state, train, rank, log)
    with run_lock(out) if rank == 0 else contextlib.nullcontext():  # one process trains into a folder
        if rank == 0:
            if resume:
                _write_or_say(out, lambda: _tidy_resumed(out, state.history), "the resumed run's files",
                              state.start_epoch - 1)
            else:
                prepare_run_folder(out, force)
                _write_or_say(out, lambda: atomic_write_bytes(out / "config.json", json.dumps(
                    config.to_dict(), indent=2).encode()), "config.json", 0)
        board = None
        if tensorboard and rank == 0:
            from zoomnet.runs.board import open_board

            board = open_board(out)
        _fit(config, state, train, val, out, dev, rank, world, log, progress, _Saver(out, state, classes, board, val))
        if board is not None:
            board.close()
    if rank == 0 and state.history:
        log(summary(out, state.history, val_csv))
    distributed.barrier(world)
    return state.history


def _fit(config: RunConfig, state: _State, train: list[Example], val: list[Example], out: Path, dev: torch.device,
         rank: int, world: int, log, progress: bool, saver: _Saver) -> None:
    """The epochs, with a diverged step reported in one line naming the last good checkpoint."""
    class_weight = None
    if config.data.class_weights:
        counts = torch.bincount(torch.tensor([e.label for e in train]), minlength=config.model.num_classes).float()
        class_weight = (counts.sum() / (config.model.num_classes * counts.clamp_min(1))).to(dev)
    try:
        fit(state.model, train, val, config.train, log=log, progress=progress, on_epoch=saver,
            optimizer=state.optimizer, scheduler=state.scheduler, generator=state.generator, history=state.history,
            start_epoch=state.start_epoch, wrapped=distributed.wrap(state.model, dev, world),
            class_weight=class_weight, augment=config.data.augment_strength if config.data.augment else 0.0,
            rank=rank, world=world, autocast=dev.type == "cuda" and config.train.bf16)
    except NonFiniteLoss as exc:
        last = out / "last.safetensors"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise UserError(f"{exc}; training stopped ({kept}); lower train.lr or check the images") from None
    except OUT_OF_MEMORY as exc:
        raise UserError(f"out of memory on {dev} while training ({str(exc).splitlines()[0][:120]}); lower "
                        "train.batch_size or model.train_samples, or set model.strip_rows for large images; the "
                        f"finished epochs are in {out}: resume with {{resume}}", resume=RESUME) from None
