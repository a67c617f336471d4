"""Runs on disk: train from manifests into a run folder, resume, evaluate, predict.

A run folder holds everything needed to reproduce or use it:

    config.json          the resolved configuration, with the class list
    metrics.csv          one row per epoch: loss terms, accuracies, AUC, hit rates, speed
    last.safetensors     weights after the last finished epoch (+ last.json: config, state)
    last.optim.pt        optimiser, schedule and random state for --resume (tensors only)
    best.safetensors     weights of the best validation epoch (+ best.json)

Every file is written to a temporary name and renamed into place, so a crash at any moment
leaves the previous epoch's files whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from zoomnet.checkpoint import atomic_write_bytes, load_checkpoint, load_tensors_only, save_checkpoint
from zoomnet.config import RunConfig, config_from_dict
from zoomnet.data.manifest import class_list, load_examples, read_manifest, resolve_reference
from zoomnet.data.examples import Example
from zoomnet.errors import ImageError, UserError
from zoomnet.model import build_model
from zoomnet.train import (
    NonFiniteLoss, attention_started, contrastive_active, evaluate, flat_learning_warning, make_optimizer,
    train_epoch,
)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose cpu, cuda or auto")
    return torch.device(name)


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney statistic, ties counted half).

    >>> binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    0.75
    """
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, balanced accuracy, confusion matrix (rows: truth) and AUC when binary."""
    k = probs.shape[1]
    pred = probs.argmax(1)
    confusion = torch.zeros(k, k, dtype=torch.long)
    for t, p in zip(labels.tolist(), pred.tolist()):
        confusion[t, p] += 1
    per_class = [confusion[c, c].item() / confusion[c].sum().item() for c in range(k) if confusion[c].sum() > 0]
    out = {
        "accuracy": float((pred == labels).float().mean()) if len(labels) else float("nan"),
        "balanced_accuracy": sum(per_class) / len(per_class) if per_class else float("nan"),
        "confusion": confusion.tolist(),
    }
    if k == 2:
        out["auc"] = binary_auc(probs[:, 1], labels)
    return out


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


def _save_resume_state(out: Path, optimizer, scheduler, generator: torch.Generator) -> None:
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler else {},
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out / "last.optim.pt", buf.getvalue())


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
) -> list[dict]:
    """Train a model on the manifests, writing the run folder; returns the epoch rows.

    With ``resume``, the run's saved configuration is used; ``epochs`` (if given) extends
    or shortens it.
    """
    out = Path(out_dir)
    rank, world = _distributed()
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)

    history: list[dict] = []
    start_epoch = 1
    best = -math.inf
    if resume:
        if not (out / "last.safetensors").is_file() or not (out / "config.json").is_file():
            raise UserError(f"{out}: no checkpoint to resume from (last.safetensors); train without --resume first")
        config = config_from_dict(json.loads((out / "config.json").read_text()), str(out / "config.json"))
    if epochs is not None:
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

    train = load_examples(train_csv, classes, config.data.fill, "training", config.data.target_mpp)
    val = load_examples(val_csv, classes, config.data.fill, "training", config.data.target_mpp) if val_csv else []
    check_image_sizes(train + val, config.model, "the model")
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
        resume_state = load_tensors_only(out / "last.optim.pt", dev)
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler:
            scheduler.load_state_dict(resume_state["scheduler"])
        generator.set_state(resume_state["generator"])
        torch.set_rng_state(resume_state["torch_rng"])
        history = state.get("history", [])
        start_epoch = state["epoch"] + 1
        best = state.get("best", -math.inf)
        log(f"resuming {out} after epoch {state['epoch']}")
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", json.dumps(config.to_dict(), indent=2).encode())

    majority = max(torch.bincount(torch.tensor([e.label for e in train])).tolist()) / max(len(train), 1)
    class_weight = None
    if config.data.class_weights:
        counts = torch.bincount(torch.tensor([e.label for e in train]), minlength=len(classes)).float()
        class_weight = (counts.sum() / (len(classes) * counts.clamp_min(1))).to(dev)

    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    for epoch in range(start_epoch, config.train.epochs + 1):
        tick = time.perf_counter()
        try:
            row = {"epoch": epoch, **train_epoch(
                wrapped, train, config.train, optimizer, epoch, generator, progress and rank == 0,
                class_weight=class_weight, augment=config.data.augment_strength if config.data.augment else 0.0,
                rank=rank, world=world, autocast=dev.type == "cuda",
                contrastive=contrastive_active(config.train, epoch, history, len(classes)),
            )}
        except NonFiniteLoss as exc:
            kept = f"the last good checkpoint is {out / 'last.safetensors'}" if (out / "last.safetensors").exists() else "no checkpoint was written yet"
            raise UserError(f"{exc}; training stopped ({kept}); lower train.lr or check the images") from None
        if scheduler:
            scheduler.step()
        if val and rank == 0:
            res = evaluate(model, val, config.train.batch_size, seed=config.train.seed)
            m = classification_metrics(res["probabilities"], res["labels"])
            row.update(val_accuracy=m["accuracy"], val_balanced_accuracy=m["balanced_accuracy"],
                       val_hit_rate=res["hit_rate"])
            if "auc" in m:
                row["val_auc"] = m["auc"]
        row["seconds"] = time.perf_counter() - tick
        history.append(row)
        if rank == 0:
            score = row.get("val_accuracy", row["train_accuracy"])
            improved = score > best
            best = max(best, score)
            state = {"epoch": epoch, "history": history, "best": best, "classes": classes}
            save_checkpoint(model, out / "last.safetensors", state)
            _save_resume_state(out, optimizer, scheduler, generator)
            if improved:
                save_checkpoint(model, out / "best.safetensors", state)
            _write_metrics(out / "metrics.csv", history)
            terms = "  ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss_"))
            val_txt = f"  val acc {row['val_accuracy']:.3f}" if "val_accuracy" in row else ""
            if "train_images_hit" in row and any(e.mask is not None for e in train[:1]):
                val_txt += f"  sub-tiles on objects {row['train_hit_rate']:.1%}"
            entropy = [f"{v:.2f}" for k, v in row.items() if k.startswith("attention_entropy_")]
            if entropy:
                val_txt += f"  attention entropy {'/'.join(entropy)}"
            if "subtile_signal" in row:
                val_txt += f"  sub-tile signal {row['subtile_signal']:.2f}"
            log(f"epoch {epoch}/{config.train.epochs}  {terms}  train acc {row['train_accuracy']:.3f}{val_txt}"
                f"  {row['images_per_s']:.1f} img/s")
            if config.train.contrastive_from == "auto" and attention_started(row, len(classes)) and not any(
                attention_started(r, len(classes)) for r in history[:-1]
            ):
                log(f"epoch {epoch}: the attention has started (entropy and sub-tile signal); "
                    "the contrastive term joins from the next epoch")
            if epoch in (2, 5) and (warning := flat_learning_warning(row, len(classes), majority)):
                log(f"warning: {warning}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return history


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
    config = config_from_dict(json.loads((run / "config.json").read_text()), str(run / "config.json"))
    model, _ = load_checkpoint(path, device=str(resolve_device(device)))
    return model.eval(), config


def evaluate_run(
    run_dir: str | Path, test_csv: str | Path, deterministic: bool = False, samples: int | None = None,
    seed: int = 0, device: str = "cpu", batch_size: int = 8,
) -> dict:
    """Metrics of a run on a manifest: accuracy, balanced accuracy, AUC (binary), confusion."""
    model, config = load_run(run_dir, device)
    classes = config.data.classes
    examples = load_examples(test_csv, classes, config.data.fill, "evaluated", config.data.target_mpp)
    check_image_sizes(examples, config.model, f"the model in {run_dir}")
    res = evaluate(model, examples, batch_size, deterministic=deterministic, samples=samples, seed=seed)
    metrics = classification_metrics(res["probabilities"], res["labels"])
    metrics.update(images=len(examples), classes=classes, hit_rate=res["hit_rate"], images_hit=res["images_hit"])
    return metrics


def geojson_of(out, index: int, classes: list[str]) -> dict:
    """The sampled regions of one image as a GeoJSON FeatureCollection (QuPath imports it)."""
    features = []
    for level, trace in enumerate(out.levels, start=1):
        for s in trace.samples[index]:
            b = s.box
            ring = [[b.left, b.top], [b.left + b.width, b.top], [b.left + b.width, b.top + b.height],
                    [b.left, b.top + b.height], [b.left, b.top]]
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"level {level} w={s.weight:.4f}",
                    "level": level, "weight": s.weight, "count": s.count,
                    "measurements": {"weight": s.weight},
                },
            })
    return {"type": "FeatureCollection", "features": features}


def predict_images(
    run_dir: str | Path, images: list[str], deterministic: bool = False, samples: int | None = None,
    seed: int = 0, device: str = "cpu", heatmaps: str | Path | None = None, geojson: str | Path | None = None,
    emit: Callable[[dict], None] | None = None, progress: bool = False,
) -> list[dict]:
    """Predict each image; one result dict per image (also passed to ``emit`` as it comes)."""
    from tqdm import tqdm

    from zoomnet.data.manifest import LazyImage
    from zoomnet.heatmap import render_batch

    model, config = load_run(run_dir, device)
    classes = config.data.classes
    generator = torch.Generator().manual_seed(seed)
    results = []
    for given in tqdm(images, desc="predict", unit="image", disable=not progress):
        tick = time.perf_counter()
        src = LazyImage(Path(given), given, config.data.fill, config.data.target_mpp)
        check_image_sizes([Example(src, 0, None, given)], config.model, f"the model in {run_dir}")
        out = model.predict([src], deterministic=deterministic, samples=samples, generator=generator)
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
        stem = Path(given).stem.removesuffix(".ome")
        if heatmaps is not None and out.levels:
            title = f"{given}: {result['label']} (p = {max(probs):.2f})"
            (picture,) = render_batch(model, [src], out, [Path(heatmaps) / f"{stem}.png"], [title])
            result["heatmap"] = str(picture)
        if geojson is not None and out.levels:
            Path(geojson).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(geojson) / f"{stem}.geojson", json.dumps(geojson_of(out, 0, classes)).encode())
        results.append(result)
        if emit:
            emit(result)
    return results
