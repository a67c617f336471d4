"""Training: one step, one epoch, and :func:`fit`, the epoch loop (docs/design.md, "Losses"
and "Training dynamics").

The attention nets learn only through sampled locations, so every epoch reports how often
sampled sub-tiles hit the objects where masks are known, how far the attention has left
uniform and what the sampled sub-tiles tell of the label: the first things to look at when
accuracy is flat (:mod:`zoomnet.dynamics`).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from tqdm import tqdm

from zoomnet.config.train import TrainConfig
from zoomnet.data.examples import Example, batches_by_size
from zoomnet.data.prefetch import prefetched
from zoomnet.draws import choose_train_samples
from zoomnet.dynamics import (
    attention_active,
    attention_started,
    contrastive_active,
    flat_learning_warning,
    signal_started,
)
from zoomnet.evaluate import evaluate
from zoomnet.metrics import attention_entropy_values, log_loss, object_hits, subtile_signal_value
from zoomnet.model import ZoomIn, ZoomInOutput
from zoomnet.objective import training_loss
from zoomnet.sources.jitter import JitteredSource
from zoomnet.sources.base import level0_size, read_totals

__all__ = ["NonFiniteLoss", "TrainConfig", "evaluate", "fit", "make_optimizer", "make_scheduler", "train_epoch",
           "training_step"]


class NonFiniteLoss(RuntimeError):
    """Raised when a loss, a gradient or the weights become NaN or infinite."""


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with a separate learning rate for the attention nets; a frozen feature net's
    weights (no ``requires_grad``) are left out."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    att = [p for n, p in params if n.startswith("attention.")]
    rest = [p for n, p in params if not n.startswith("attention.")]
    groups = [{"params": rest, "lr": cfg.lr}]
    if att:
        groups.append({"params": att, "lr": cfg.attention_lr or cfg.lr})
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """The learning-rate schedule: a step decay every ``lr_step`` epochs, or None."""
    return torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step, cfg.lr_gamma) if cfg.lr_step else None


def whole_views(model: torch.nn.Module, sources: list) -> torch.Tensor | None:
    """The level-1 views the model's forward would read whole (None where it reads them in
    strips: a gigapixel view is never held at once)."""
    if isinstance(model, ZoomIn) and model.views_in_strips(sources[0].height, sources[0].width):
        return None
    return model.read_views(sources)


def training_step(
    model: torch.nn.Module, batch: list[Example], cfg: TrainConfig, optimizer: torch.optim.Optimizer,
    generator: torch.Generator, *, views: torch.Tensor | None = None, contrastive: bool = False,
    attention: bool = True, autocast: bool = False, class_weight: torch.Tensor | None = None,
    augment: float = 0.0, check_finite: bool = True,
) -> tuple[ZoomInOutput, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step: forward (with the contrastive pass where asked), the loss,
    backward, clipping and the update.

    Args:
        model: the model, or its DistributedDataParallel wrapper.
        views: the batch's level-1 views, read ahead (None: the model reads them).
        contrastive: with the contrastive term.
        attention: whether the attention nets learn (False: their gradients are dropped
            before the update; ``TrainConfig.attention_from``).
        autocast: bfloat16 autocast of the nets on CUDA (estimator and losses in float32).
        class_weight: cross-entropy weight per class (imbalanced sets).
        augment: colour-jitter strength (0: none); one draw per image, for all it reads.
        check_finite: read the loss and the gradient norm back and raise at once if either
            is not finite (two waits for the device a step). False: the caller checks them
            later (the epoch loop does, every few steps: :class:`_EpochStats`).

    Returns:
        The output, the labels, the loss and its terms (detached 0-d tensors, with the
        gradient norm as ``grad_norm``).

    Raises:
        NonFiniteLoss: the loss or the gradient norm is not finite (with ``check_finite``).
    """
    core = getattr(model, "module", model)
    device = next(core.parameters()).device
    labels = torch.tensor([ex.label for ex in batch], device=device)
    sources = [ex.source for ex in batch]
    if augment:
        sources = [JitteredSource(s, augment, generator) for s in sources]
        if views is not None:  # the image's jitter draw, as a read through its JitteredSource
            views = torch.stack([s.jitter(v) for s, v in zip(sources, views)])
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
        out = model(sources, views=views, contrastive=contrastive, generator=generator)
    loss, terms = training_loss(core, out, batch, labels, cfg, contrastive, class_weight)
    loss_value = float(loss.detach()) if check_finite else None  # no backward through a non-finite loss
    if loss_value is not None and not math.isfinite(loss_value):
        raise NonFiniteLoss(f"loss is {loss_value} ({_readable(terms)})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if not attention:  # a parameter without a gradient is left alone by Adam
        for name, p in core.named_parameters():
            if name.startswith("attention."):
                p.grad = None
    # the norm also tells whether a gradient blew up (clip 0: measured, not clipped)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or float("inf"))
    if check_finite:
        check_step(loss_value, norm, terms)
    else:  # checked later: a non-finite step's gradients are zeroed on the device, the weights stay finite
        bad = ~torch.isfinite(norm)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.masked_fill_(bad, 0.0)
    optimizer.step()
    return out, labels, loss, {**terms, "grad_norm": norm.detach()}


def check_step(loss: float | torch.Tensor, norm: float | torch.Tensor, terms: dict) -> None:
    """Raise :class:`NonFiniteLoss` for a step whose loss or gradient norm is not finite."""
    loss, norm = float(loss), float(norm)
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss} ({_readable(terms)})")
    if not math.isfinite(norm):
        raise NonFiniteLoss(f"the gradients are not finite (norm {norm}), loss {_readable(terms)}")


def _readable(terms: dict) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in terms.items() if k != "grad_norm"}


class _EpochStats:
    """What one epoch's steps add up to: mean loss terms, accuracy, hit rates, attention
    entropy per level and the sub-tile signal."""

    every = 8  # steps between reads of the accumulated values (the only waits for the device)

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.correct = self.seen = 0
        self.hits = [0, 0, 0, 0]
        self.entropy: list[list[float]] = []  # per batch, per level
        self.signal: list[float] = []
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []  # per step: images, device values
        self.read_from = read_totals()  # the process's file reads when the epoch began
        self.level0 = 0  # level-0 pixels of the images stepped on

    def add(self, core: torch.nn.Module, out: ZoomInOutput, batch: list[Example], labels: torch.Tensor,
            terms: dict[str, torch.Tensor], loss: torch.Tensor | None = None) -> None:
        """One step's values, kept on the device; read back every ``every`` steps
        (:meth:`flush`), where a non-finite loss or gradient raises."""
        values = dict(terms)
        values["correct"] = (out.logits.detach().argmax(1) == labels).sum()  # this rank's share
        if loss is not None:
            values["loss"] = loss.detach()
        if isinstance(core, ZoomIn):
            values["entropy"] = attention_entropy_values(out)
            if out.leaf_features is not None:
                with torch.no_grad():
                    values["signal"] = subtile_signal_value(core.classifier(out.leaf_features), out.leaf_image, labels)
        self.hits = [a + b for a, b in zip(self.hits, object_hits(out, batch))]  # masks: on the host
        self.level0 += sum(math.prod(level0_size(e.source)) for e in batch)
        self._pending.append((len(batch), values))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Read the pending steps' values back in one transfer, add them up, and raise
        :class:`NonFiniteLoss` at the first step whose loss or gradient norm is not finite."""
        if not self._pending:
            return
        flat = [v.detach().float().reshape(-1) for _, values in self._pending for v in values.values()]
        host = torch.cat([v.to(flat[0].device) for v in flat]).cpu().tolist()
        at = 0
        for size, values in self._pending:
            step = {}
            for key, v in values.items():
                n = v.numel()
                step[key] = host[at:at + n] if key == "entropy" else host[at]
                at += n
            self._fold(size, step)
        self._pending = []

    def _fold(self, size: int, step: dict) -> None:
        correct, entropy, signal = step.pop("correct"), step.pop("entropy", None), step.pop("signal", None)
        check_step(step.pop("loss", 0.0), step.pop("grad_norm", 0.0), step)  # the rest: the loss terms
        self.correct += int(correct)
        self.seen += size
        if entropy is not None:
            self.entropy.append(entropy)
        if signal is not None:
            self.signal.append(signal)
        for k, v in step.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * size

    def row(self, seconds: float) -> dict[str, float]:
        seen = max(self.seen, 1)
        stats = {f"loss_{k}": v / seen for k, v in self.sums.items()}
        stats.update(
            train_accuracy=self.correct / seen,
            train_hit_rate=self.hits[0] / self.hits[1] if self.hits[1] else math.nan,  # undefined without masks
            train_images_hit=self.hits[2] / self.hits[3] if self.hits[3] else math.nan,
            seconds=seconds,
            images_per_s=self.seen / max(seconds, 1e-9),
        )
        # what this process's files decoded and read in the epoch (level-1 views read ahead included)
        pixels, nbytes = (now - then for now, then in zip(read_totals(), self.read_from))
        stats.update(pixels_decoded=pixels, bytes_read=nbytes, decoded_share=pixels / self.level0 if self.level0 else math.nan)
        for level, values in enumerate(zip(*self.entropy), start=1):
            stats[f"attention_entropy_{level}"] = sum(values) / len(values)
        signal = [v for v in self.signal if math.isfinite(v)]  # a batch without sub-tiles has none
        if signal:
            stats["subtile_signal"] = sum(signal) / len(signal)
        return stats


def train_epoch(
    model: torch.nn.Module, examples: list[Example], cfg: TrainConfig, optimizer: torch.optim.Optimizer,
    epoch: int, generator: torch.Generator, progress: bool = True,
    class_weight: torch.Tensor | None = None, augment: float = 0.0, rank: int = 0, world: int = 1,
    autocast: bool = False, contrastive: bool | None = None, prefetch: bool = True, attention: bool = True,
) -> dict[str, float]:
    """One pass over ``examples``; returns mean loss terms, accuracy and hit rates.

    Args:
        model: the model, or its DistributedDataParallel wrapper.
        rank: this process's rank; each takes every ``world``-th batch.
        world: number of processes (torch.distributed).
        contrastive: with the contrastive term (None: by ``cfg.contrastive_from`` as an
            epoch; see :func:`zoomnet.dynamics.contrastive_active`).
        prefetch: read the next batch's level-1 views in a thread while a batch trains.
        class_weight, augment, autocast, attention: as in :func:`training_step`.
    """
    core = getattr(model, "module", model)
    model.train()
    if contrastive is None:
        contrastive = cfg.contrastive_from not in (None, "auto") and epoch >= cfg.contrastive_from
    stats = _EpochStats()
    start = time.perf_counter()
    batches = batches_by_size(examples, cfg.batch_size, shuffle=True, generator=generator)
    if world > 1:  # every rank the same number of steps, so gradient all-reduces pair up
        batches = batches[rank::world][: len(batches) // world]
    bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False)
    # the level-1 views do not depend on the weights: a thread reads (decodes, resamples) the
    # next batch's while this one trains; the same pixels, the same draws
    read = (lambda idx: whole_views(core, [examples[i].source for i in idx])) if prefetch else (lambda idx: None)
    for idx, views in prefetched(read, batches, workers=1, ahead=1, name="zoomnet-views"):
        batch = [examples[i] for i in idx]
        try:
            out, labels, loss, terms = training_step(
                model, batch, cfg, optimizer, generator, views=views.result(), contrastive=contrastive,
                attention=attention, autocast=autocast, class_weight=class_weight, augment=augment,
                check_finite=False)
            stats.add(core, out, batch, labels, terms, loss)  # read back every few steps, checked there
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(f"{exc} at epoch {epoch}") from None
        if stats.seen:
            bar.set_postfix(loss=f"{stats.sums.get('ce', 0.0) / stats.seen:.3f}", acc=f"{stats.correct / stats.seen:.2f}")
        bar.update(1)
    try:
        stats.flush()
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(f"{exc} at epoch {epoch}") from None
    bar.close()
    seconds = time.perf_counter() - start
    # once an epoch, not every step: finite gradients and a sane learning rate keep the weights
    # finite, and this is what stands between a diverged epoch and its checkpoint
    if not all(bool(torch.isfinite(p).all()) for p in core.parameters()):
        raise NonFiniteLoss(f"the weights became non-finite at epoch {epoch} (the step diverged)")
    return stats.row(seconds)


def epoch_line(row: dict, epochs: int, masks: bool) -> str:
    """The log line of one epoch's row.

    >>> epoch_line({"epoch": 1, "loss_ce": 0.7, "train_accuracy": 0.5, "attention_entropy_1": float("nan"),
    ...             "attention_entropy_2": 0.73, "images_per_s": 2.0}, 3, False)
    'epoch 1/3  ce 0.700  train acc 0.500  attention entropy -/0.73  2.0 img/s'
    """
    terms = "  ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss_"))
    text = f"  val acc {row['val_accuracy']:.3f}" if "val_accuracy" in row else ""
    if "train_images_hit" in row and masks:
        text += f"  sub-tiles on objects {row['train_hit_rate']:.1%}"
    # "-": a level whose maps all have one cell (an image no larger than a tile) has no entropy
    entropy = [f"{v:.2f}" if math.isfinite(v) else "-" for k, v in row.items() if k.startswith("attention_entropy_")]
    if entropy:
        text += f"  attention entropy {'/'.join(entropy)}"
    if "subtile_signal" in row:
        text += f"  sub-tile signal {row['subtile_signal']:.2f}"
    return f"epoch {row['epoch']}/{epochs}  {terms}  train acc {row['train_accuracy']:.3f}{text}  {row['images_per_s']:.1f} img/s"


def _validate(model: torch.nn.Module, val: list[Example], cfg: TrainConfig, progress: bool, epoch: int) -> dict:
    """The validation columns of an epoch's row."""
    res = evaluate(model, val, cfg.batch_size, seed=cfg.seed, progress=progress, desc=f"validate {epoch}")
    row = dict(val_accuracy=res["accuracy"], val_balanced_accuracy=res["balanced_accuracy"],
               val_hit_rate=res["hit_rate"], val_loss=log_loss(res["probabilities"], res["labels"]))
    if "auc" in res:
        row["val_auc"] = res["auc"]
    return row


def _log_epoch(log: Callable[[str], None], row: dict, history: list[dict], cfg: TrainConfig, num_classes: int,
               majority: float, masks: bool) -> None:
    """The epoch's line, the start of the attention and the flat-accuracy warnings."""
    log(epoch_line(row, cfg.epochs, masks))

    def first(started: Callable[[dict, int], bool]) -> bool:  # this epoch is the first to show it
        return started(row, num_classes) and not any(started(r, num_classes) for r in history[:-1])

    epoch = row["epoch"]
    if cfg.contrastive_from == "auto" and first(attention_started):
        log(f"epoch {epoch}: the attention has started (entropy and sub-tile signal); "
            "the contrastive term joins from the next epoch")
    if cfg.attention_from == "auto" and first(signal_started):
        log(f"epoch {epoch}: the sampled sub-tiles carry the label (sub-tile signal "
            f"{row['subtile_signal']:.2f}); the attention learns from the next epoch")
    if epoch in (2, 5) and (warning := flat_learning_warning(row, num_classes, majority)):
        log(f"warning: {warning}")


def fit(
    model: torch.nn.Module, train: list[Example], val: list[Example], cfg: TrainConfig,
    log: Callable[[str], None] = print, progress: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None, *,
    optimizer: torch.optim.Optimizer | None = None, scheduler=None, generator: torch.Generator | None = None,
    history: list[dict] | None = None, start_epoch: int = 1, wrapped: torch.nn.Module | None = None,
    class_weight: torch.Tensor | None = None, augment: float = 0.0, rank: int = 0, world: int = 1,
    autocast: bool = False,
) -> list[dict]:
    """The one epoch loop: train, step the schedule, validate on ``val``, call ``on_epoch``
    (``zoomnet train`` writes its checkpoints there), log the epoch's line, the start of the
    attention and the flat-accuracy warnings.

    The keyword arguments let a caller resume (``optimizer``, ``scheduler``, ``generator``
    and ``history`` restored, ``start_epoch``) and train a DistributedDataParallel
    ``wrapped`` copy on rank ``rank`` of ``world`` (validation, ``on_epoch`` and the log on
    rank 0). Without them the run starts from ``cfg.seed``.

    Returns:
        One row of statistics per epoch (``history`` with the new rows).
    """
    if generator is None:
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
    core = getattr(model, "module", model)
    if getattr(core.config, "train_samples", None) == "auto":  # zoomnet train chooses it before it writes the run
        core.config.train_samples = choose_train_samples(core, train, cfg).samples
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
    scheduler = scheduler if scheduler is not None else make_scheduler(optimizer, cfg)
    history = history if history is not None else []
    num_classes = getattr(model, "module", model).config.num_classes
    labels = [e.label for e in train]
    majority = max(labels.count(c) for c in set(labels)) / len(labels) if labels else 0.0
    masks = any(e.mask is not None for e in train[:1])
    for epoch in range(start_epoch, cfg.epochs + 1):
        tick = time.perf_counter()
        row = {"epoch": epoch, **train_epoch(
            wrapped or model, train, cfg, optimizer, epoch, generator, progress and rank == 0,
            class_weight=class_weight, augment=augment, rank=rank, world=world, autocast=autocast,
            contrastive=contrastive_active(cfg, epoch, history, num_classes),
            attention=attention_active(cfg, epoch, history, num_classes),
        )}
        if scheduler:
            scheduler.step()
        if val and rank == 0:
            row.update(_validate(model, val, cfg, progress, epoch))
        row["seconds"] = time.perf_counter() - tick
        history.append(row)
        if rank != 0:
            continue
        if on_epoch:
            on_epoch(epoch, row)
        _log_epoch(log, row, history, cfg, num_classes, majority, masks)
    return history
