"""Training and evaluation loops over in-memory examples (docs/design.md, "Losses" and
"Training dynamics").

The attention nets learn only through sampled locations, so the loop reports, per epoch,
how often sampled sub-tiles hit the objects where masks are known: the first thing to look
at when accuracy is flat.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from zoomnet.runtime.allocator import reuse_freed_memory
from zoomnet.config.train import TrainConfig
from zoomnet.core import losses, sampling
from zoomnet.core.geometry import Box
from zoomnet.data.augment import JitteredSource
from zoomnet.data.examples import Example, batches_by_size
from zoomnet.metrics import classification_metrics, leaf_probabilities, log_loss, spearman
from zoomnet.model import ZoomIn, ZoomInOutput


def attention_started(row: dict, num_classes: int) -> bool:
    """Whether an epoch's statistics show the attention at work: some level's maps have left
    uniform (mean entropy at most 0.9 of a uniform map's) and the sampled sub-tiles carry the
    label (``subtile_signal`` at least halfway from chance to certainty).

    >>> attention_started({"attention_entropy_1": 0.7, "subtile_signal": 0.9}, 2)
    True
    >>> attention_started({"attention_entropy_1": 0.99, "subtile_signal": 0.9}, 2)
    False
    """
    levels = [v for k, v in row.items() if k.startswith("attention_entropy_") and math.isfinite(v)]
    return bool(levels) and min(levels) <= 0.9 and signal_started(row, num_classes)


def signal_started(row: dict, num_classes: int) -> bool:
    """Whether an epoch's sampled sub-tiles carry the label: ``subtile_signal`` at least
    halfway from chance to certainty.

    >>> signal_started({"subtile_signal": 0.7}, 4), signal_started({"subtile_signal": 0.5}, 4)
    (True, False)
    """
    signal = row.get("subtile_signal")
    return signal is not None and signal >= (1 + 1 / num_classes) / 2


def attention_active(cfg: TrainConfig, epoch: int, history: list[dict], num_classes: int) -> bool:
    """Whether the attention nets learn in epoch ``epoch`` (``history``: earlier epochs).

    >>> cfg = TrainConfig(attention_from="auto")
    >>> attention_active(cfg, 2, [{"subtile_signal": 0.3}], 4), attention_active(cfg, 3, [{"subtile_signal": 0.7}], 4)
    (False, True)
    """
    if cfg.attention_from is None:
        return True
    if cfg.attention_from == "auto":
        return any(signal_started(row, num_classes) for row in history)
    return epoch >= cfg.attention_from


def contrastive_active(cfg: TrainConfig, epoch: int, history: list[dict], num_classes: int) -> bool:
    """Whether epoch ``epoch`` trains with the contrastive term (``history``: earlier epochs)."""
    if cfg.contrastive_from is None:
        return False
    if cfg.contrastive_from == "auto":
        return any(attention_started(row, num_classes) for row in history)
    return epoch >= cfg.contrastive_from


def flat_learning_warning(row: dict, num_classes: int, majority: float) -> str | None:
    """A warning, with the measured numbers and what to try, when an epoch shows training
    at chance: accuracy near the majority class's share, and the attention still uniform
    or the sampled sub-tiles telling nothing of the label (None otherwise)."""
    if "subtile_signal" not in row or attention_started(row, num_classes):
        return None
    chance = 1 / num_classes
    entropy = [v for k, v in sorted(row.items()) if k.startswith("attention_entropy_")]
    flat = row["train_accuracy"] <= majority + 0.05
    uniform = all(v >= 0.95 for v in entropy)
    blind = row["subtile_signal"] < chance + 0.15 * (1 - chance)
    if not flat or not (uniform or (blind and row["epoch"] >= 5)):
        return None
    what = ("the attention is still uniform, so sampling has not found where to look" if uniform else
            "the attention has moved, but the sampled sub-tiles still tell nothing of the label")
    return (
        f"after epoch {row['epoch']} training accuracy is {row['train_accuracy']:.3f} (majority class "
        f"{majority:.3f}), attention entropy {'/'.join(f'{v:.2f}' for v in entropy)} of uniform per level, "
        f"best sampled sub-tile p(label) {row['subtile_signal']:.2f} (chance {chance:.2f}): {what}. Try more "
        "training draws (--set model.train_samples=...), sub-tiles that hold a whole object "
        "(model.levels.-1.region), the instance and distillation terms (train.instance_weight=4 "
        "train.distill_weight=1), or a mask column in the manifest to see hit rates; docs/design.md, "
        "'When accuracy is flat'"
    )


class NonFiniteLoss(RuntimeError):
    """Raised when a loss becomes NaN or infinite."""


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with a separate learning rate for the attention nets."""
    att = [p for n, p in model.named_parameters() if n.startswith("attention.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("attention.")]
    groups = [{"params": rest, "lr": cfg.lr}]
    if att:
        groups.append({"params": att, "lr": cfg.attention_lr or cfg.lr})
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def object_hits(out: ZoomInOutput, examples: list[Example]) -> tuple[int, int, int, int]:
    """Count sampled sub-tiles that overlap an object, on images with an object mask.

    Returns:
        ``(sub-tiles hitting, sub-tiles, images with a hit, images with objects)``.
    """
    if not out.levels:
        return 0, 0, 0, 0
    hit_tiles = tiles = hit_images = images = 0
    for ex, leaves in zip(examples, out.levels[-1].samples):
        if ex.mask is None:
            continue
        if not ex.has_objects():
            continue
        images += 1
        hits = [float(ex.mask.read(s.box).max()) > 0 for s in leaves]
        hit_tiles += sum(hits)
        tiles += len(hits)
        hit_images += any(hits)
    return hit_tiles, tiles, hit_images, images


def mask_coverage(model: ZoomIn, out: ZoomInOutput, examples: list[Example]) -> tuple[list, list]:
    """Per attention map of images with objects: ``(log map, object coverage per cell)``."""
    maps, covers = [], []
    for level, lv in enumerate(model.config.levels):
        t_h, t_w = lv.cell_stride()
        for b, ex in enumerate(examples):
            if ex.mask is None:
                continue
            for box, lp in zip(out.parents[level][b], out.log_maps[level][b]):
                g_h, g_w = (out.levels[level].grid if level else model._level_grid(0, (box.height, box.width)).grid)
                span = Box(box.top, box.left, round(g_h * t_h), round(g_w * t_w))
                cov = ex.mask.read(span, (g_h, g_w))[0].flatten()  # (G,) fraction covered
                maps.append(lp.flatten())
                covers.append(cov.to(lp))
    return maps, covers


def attention_entropy(out: ZoomInOutput) -> list[float]:
    """Per level, the mean entropy of its attention maps over that of a uniform map over
    the cells the map may draw (1 = uniform, 0 = all mass on one cell; cells it leaves out,
    outside the image or off the tissue, do not count); maps of one such cell are left out.

    >>> import math
    >>> uniform = torch.full((1, 4), math.log(0.25))
    >>> attention_entropy(ZoomInOutput(None, None, [], [[uniform]], []))
    [1.0]
    >>> three = torch.log(torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]])).clamp_min(-1e4)  # one cell left out
    >>> round(attention_entropy(ZoomInOutput(None, None, [], [[three]], []))[0], 6)
    1.0
    """
    values = []
    for level in out.log_maps:
        ratios = []
        for lp in level:
            if not lp.numel():
                continue
            lp = lp.detach().float()
            cells = sampling.drawable(lp).sum(-1)  # (M,) cells each map may draw
            keep = cells > 1
            if keep.any():
                ratios.append(-(lp.exp() * lp).sum(-1)[keep] / cells[keep].double().log().float())
        values.append(float(torch.cat(ratios).mean()) if ratios else float("nan"))
    return values


def subtile_signal(leaf_logits: torch.Tensor, leaf_image: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of the best ``p(image label)`` among its sampled sub-tiles: ``1 /
    classes`` while ``f`` sees nothing in them, near 1 once each image has a telling one."""
    probs = torch.softmax(leaf_logits.detach().float(), dim=1)
    p_label = probs.gather(1, labels[leaf_image][:, None]).squeeze(1)  # (L,)
    best = torch.full((len(labels),), float("nan")).scatter_reduce(
        0, leaf_image.cpu(), p_label.cpu(), reduce="amax", include_self=False
    )
    return float(best[~best.isnan()].mean()) if (~best.isnan()).any() else float("nan")


def training_loss(
    model: torch.nn.Module, out: ZoomInOutput, batch: list[Example], labels: torch.Tensor,
    cfg: TrainConfig, contrastive: bool, class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of one batch and its terms (``model`` unwrapped from DDP)."""
    terms: dict[str, torch.Tensor] = {"ce": F.cross_entropy(out.logits.float(), labels, weight=class_weight)}
    if isinstance(model, ZoomIn):
        if cfg.entropy_weight:
            terms["entropy"] = -cfg.entropy_weight * losses.entropy_regularizer(out.log_maps)
        if contrastive and out.contrastive_logits is not None:
            terms["contrastive"] = cfg.contrastive_weight * losses.contrastive_loss(
                out.contrastive_logits, labels, cfg.reference_class
            )
        if (cfg.instance_weight or cfg.distill_weight) and out.leaf_features is not None:
            leaf_logits = model.classifier(out.leaf_features)  # (L, classes)
            if cfg.instance_weight:
                terms["instance"] = cfg.instance_weight * losses.instance_loss(
                    leaf_logits, out.leaf_image, labels, cfg.reference_class, cfg.reference_share,
                    cfg.one_class_per_image,
                )
            if cfg.distill_weight:
                scores = losses.leaf_scores(leaf_logits, out.leaf_image, labels, cfg.reference_class)
                terms["distill"] = cfg.distill_weight * losses.attention_distillation_loss(
                    out.cell_logits, out.leaf_paths, scores
                )
        if cfg.mask_weight:
            maps, covers = mask_coverage(model, out, batch)
            terms["mask"] = cfg.mask_weight * losses.mask_attention_loss(maps, covers)
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def whole_views(model: torch.nn.Module, sources: list) -> torch.Tensor | None:
    """The level-1 views the model's forward would read whole (None where it reads them in
    strips: a gigapixel view is never held at once)."""
    if isinstance(model, ZoomIn) and model.views_in_strips(sources[0].height, sources[0].width):
        return None
    return model.read_views(sources)


def train_epoch(
    model: torch.nn.Module, examples: list[Example], cfg: TrainConfig, optimizer: torch.optim.Optimizer,
    epoch: int, generator: torch.Generator, progress: bool = True,
    class_weight: torch.Tensor | None = None, augment: float = 0.0, rank: int = 0, world: int = 1,
    autocast: bool = False, contrastive: bool | None = None, prefetch: bool = True, attention: bool = True,
) -> dict[str, float]:
    """One pass over ``examples``; returns mean loss terms, accuracy and hit rates.

    Args:
        model: the model, or its DistributedDataParallel wrapper.
        class_weight: cross-entropy weight per class (imbalanced sets).
        augment: colour-jitter strength of the training images (0: none).
        rank: this process's rank; each takes every ``world``-th batch.
        world: number of processes (torch.distributed).
        autocast: bfloat16 autocast of the nets on CUDA (estimator and losses in float32).
        contrastive: with the contrastive term (None: by ``cfg.contrastive_from`` as an
            epoch; see :func:`contrastive_active`).
        prefetch: read the next batch's level-1 views in a thread while a batch trains.
        attention: whether the attention nets learn (False: their gradients are dropped
            before the step; see ``TrainConfig.attention_from``).
    """
    reuse_freed_memory()  # where ZOOMNET_MALLOC=1 asks for it: keep freed activations (zoomnet.allocator)
    core = getattr(model, "module", model)
    device = next(core.parameters()).device
    model.train()
    if contrastive is None:
        contrastive = cfg.contrastive_from not in (None, "auto") and epoch >= cfg.contrastive_from
    sums: dict[str, float] = {}
    correct = seen = 0
    hits = [0, 0, 0, 0]
    entropy: list[list[float]] = []  # per batch, per level
    signal: list[float] = []
    start = time.perf_counter()
    batches = batches_by_size(examples, cfg.batch_size, shuffle=True, generator=generator)
    if world > 1:  # every rank the same number of steps, so gradient all-reduces pair up
        per_rank = len(batches) // world
        batches = batches[rank::world][:per_rank]
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False)
    frozen = [p for n, p in core.named_parameters() if n.startswith("attention.")]
    # the level-1 views do not depend on the weights: a thread reads (decodes, resamples) the
    # next batch's while this one trains; the same pixels, the same draws
    reader = ThreadPoolExecutor(1, thread_name_prefix="zoomnet-views") if prefetch and batches else None
    ahead = reader.submit(whole_views, core, [examples[i].source for i in batches[0]]) if reader else None
    try:
        for step, idx in enumerate(bar):
            batch = [examples[i] for i in idx]
            views = ahead.result() if ahead is not None else None
            if reader is not None and step + 1 < len(batches):
                ahead = reader.submit(whole_views, core, [examples[i].source for i in batches[step + 1]])
            labels = torch.tensor([ex.label for ex in batch], device=device)
            sources = [ex.source for ex in batch]
            if augment:
                sources = [JitteredSource(s, augment, generator) for s in sources]
                if views is not None:  # the image's jitter draw, as a read through its JitteredSource
                    views = torch.stack([s.jitter(v) for s, v in zip(sources, views)])
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                out = model(sources, views=views, contrastive=contrastive, generator=generator)
            loss, terms = training_loss(core, out, batch, labels, cfg, contrastive, class_weight)
            if not math.isfinite(float(loss.detach())):
                raise NonFiniteLoss(f"loss is {float(loss.detach())} at epoch {epoch} ({terms})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not attention:  # a parameter without a gradient is left alone by Adam
                for p in frozen:
                    p.grad = None
            # the norm also tells whether a gradient blew up (clip 0: measured, not clipped)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or float("inf"))
            if not math.isfinite(float(norm)):
                raise NonFiniteLoss(f"the gradients are not finite (norm {float(norm)}) at epoch {epoch}, loss {terms}")
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch)
            correct += int((out.logits.argmax(1) == labels).sum())  # this rank's share
            seen += len(batch)
            hits = [a + b for a, b in zip(hits, object_hits(out, batch))]
            if isinstance(core, ZoomIn):
                entropy.append(attention_entropy(out))
                if out.leaf_features is not None:
                    with torch.no_grad():
                        signal.append(subtile_signal(core.classifier(out.leaf_features), out.leaf_image, labels))
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{correct / seen:.2f}")
    finally:
        if reader is not None:
            reader.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - start
    # once an epoch, not every step: finite gradients and a sane learning rate keep the weights
    # finite, and this is what stands between a diverged epoch and its checkpoint
    if not all(bool(torch.isfinite(p).all()) for p in core.parameters()):
        raise NonFiniteLoss(f"the weights became non-finite at epoch {epoch} (the step diverged)")
    stats = {f"loss_{k}": v / max(seen, 1) for k, v in sums.items()}
    stats.update(
        train_accuracy=correct / max(seen, 1),
        train_hit_rate=hits[0] / max(hits[1], 1),
        train_images_hit=hits[2] / max(hits[3], 1),
        seconds=seconds,
        images_per_s=seen / max(seconds, 1e-9),
    )
    for level, values in enumerate(zip(*entropy), start=1):
        stats[f"attention_entropy_{level}"] = sum(values) / len(values)
    if signal:
        stats["subtile_signal"] = sum(signal) / len(signal)
    return stats


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: list[Example], batch_size: int = 16, deterministic: bool = False,
    samples: int | None = None, seed: int = 0, progress: bool = False, desc: str = "evaluate",
    localization: bool = False,
) -> dict:
    """The one evaluation loop (validation in :func:`fit`, ``zoomnet evaluate``, the bench).

    Returns:
        :func:`zoomnet.metrics.classification_metrics` (``accuracy``, ``balanced_accuracy``,
        ``confusion``, ``auc`` when binary), ``hit_rate`` (share of sampled sub-tiles on an
        object, images with objects), ``images_hit`` (share of those images with at least
        one such sub-tile), ``images_with_objects``, ``probabilities`` (``(n, classes)`` in
        the order of ``examples``) and ``labels``; with ``localization``, ``spearman``:
        Spearman's rho between each sampled sub-tile's attention probability and the
        fraction of it that objects cover, over images with objects.
    """
    reuse_freed_memory()
    generator = torch.Generator().manual_seed(seed)
    model = getattr(model, "module", model)
    probs = torch.zeros(len(examples), model.config.num_classes)
    hits = [0, 0, 0, 0]
    leaf_p, covers = [], []
    batches = batches_by_size(examples, batch_size, shuffle=False)
    bar = tqdm(total=len(examples), desc=desc, unit="image", disable=not progress, leave=False)
    for idx in batches:
        bar.update(len(idx))
        batch = [examples[i] for i in idx]
        out = model.predict([ex.source for ex in batch], deterministic=deterministic, samples=samples, generator=generator)
        probs[idx] = torch.softmax(out.logits.float(), dim=1).cpu()
        hits = [a + b for a, b in zip(hits, object_hits(out, batch))]
        if localization and out.leaf_paths:
            for path, box, p in zip(out.leaf_paths, out.leaf_boxes, leaf_probabilities(out)):
                ex = batch[path[0][0]]
                if ex.mask is not None and ex.has_objects():
                    leaf_p.append(p)
                    covers.append(float(ex.mask.read(box).mean()))
    bar.close()
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    result = {
        **classification_metrics(probs, labels),
        "hit_rate": hits[0] / max(hits[1], 1),
        "images_hit": hits[2] / max(hits[3], 1),
        "images_with_objects": hits[3],
        "probabilities": probs,
        "labels": labels,
    }
    if localization:
        result["spearman"] = spearman(leaf_p, covers) if leaf_p else float("nan")
    return result


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
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
    if scheduler is None and cfg.lr_step:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step, cfg.lr_gamma)
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
            res = evaluate(model, val, cfg.batch_size, seed=cfg.seed, progress=progress, desc=f"validate {epoch}")
            row.update(val_accuracy=res["accuracy"], val_balanced_accuracy=res["balanced_accuracy"],
                       val_hit_rate=res["hit_rate"], val_loss=log_loss(res["probabilities"], res["labels"]))
            if "auc" in res:
                row["val_auc"] = res["auc"]
        row["seconds"] = time.perf_counter() - tick
        history.append(row)
        if rank != 0:
            continue
        if on_epoch:
            on_epoch(epoch, row)
        log(epoch_line(row, cfg.epochs, masks))
        def first(started: Callable[[dict, int], bool]) -> bool:  # this epoch is the first to show it
            return started(row, num_classes) and not any(started(r, num_classes) for r in history[:-1])

        if cfg.contrastive_from == "auto" and first(attention_started):
            log(f"epoch {epoch}: the attention has started (entropy and sub-tile signal); "
                "the contrastive term joins from the next epoch")
        if cfg.attention_from == "auto" and first(signal_started):
            log(f"epoch {epoch}: the sampled sub-tiles carry the label (sub-tile signal "
                f"{row['subtile_signal']:.2f}); the attention learns from the next epoch")
        if epoch in (2, 5) and (warning := flat_learning_warning(row, num_classes, majority)):
            log(f"warning: {warning}")
    return history
