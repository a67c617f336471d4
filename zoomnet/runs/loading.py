"""Using a finished run: load its model, evaluate it on a manifest, probe what its feature
net calls the objects."""

from __future__ import annotations

from pathlib import Path

import torch

from zoomnet.checkpoint import load_checkpoint
from zoomnet.config import RunConfig
from zoomnet.data.manifest import load_examples
from zoomnet.errors import ImageError, Option, UserError
from zoomnet.evaluate import evaluate
from zoomnet.model import ZoomIn
from zoomnet.runs.folder import read_run_config
from zoomnet.runtime.allocator import reuse_freed_memory, settle_heap
from zoomnet.runtime.device import resolve_device

TRAINED_OUT = Option("out_dir of train_run", "--out folder of `zoomnet train`")


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


def check_draws(samples: int | None) -> None:
    """Refuse a number of draws below one (None: the run's own).

    Raises:
        UserError: naming the option.
    """
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise UserError("{samples}: the number of draws must be at least 1 (or left out: the run's own)",
                        samples=Option(f"samples={samples!r}", f"--samples {samples}"))


def load_run(run_dir: str | Path, device: str = "cpu", which: str = "best") -> tuple[torch.nn.Module, RunConfig]:
    """The model and configuration of a run folder (``best`` checkpoint, else ``last``)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run_dir}: no such run folder; give the {{out}}", out=TRAINED_OUT)
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


def open_run_image(path: str | Path, config: RunConfig):
    """An image or slide file opened as a run reads it (its fill value, resolution and read
    limit), lazily: only what the model asks for is decoded.

    Raises:
        ImageError: a missing, unreadable or unsupported file.
    """
    from zoomnet.sources.lazy import LazyImage

    data = config.data
    return LazyImage(Path(path), str(path), data.fill, data.target_mpp, data.max_pixels)


def evaluate_run(
    run_dir: str | Path, test_csv: str | Path, deterministic: bool = False, samples: int | None = None,
    seed: int = 0, device: str = "cpu", batch_size: int = 8, progress: bool = False, draw_sets: int = 1,
) -> dict:
    """Metrics of a run on a manifest: accuracy, balanced accuracy, AUC (binary), confusion;
    with ``draw_sets`` > 1, how often an image flagged uncertain is wrong against a confident
    one (:func:`zoomnet.evaluate.evaluate`)."""
    if isinstance(draw_sets, bool) or not isinstance(draw_sets, int) or draw_sets < 1:
        raise UserError("{sets}: give a whole number of draw sets >= 1",
                        sets=Option(f"draw_sets={draw_sets!r}", f"--draw-sets {draw_sets}"))
    check_draws(samples)
    model, config = load_run(run_dir, device)
    classes = config.data.classes
    examples = load_examples(test_csv, classes, config.data.fill, "evaluated", config.data.target_mpp,
                             config.data.max_pixels)
    check_image_sizes(examples, config.model, f"the model in {run_dir}")
    settle_heap()
    reuse_freed_memory()
    res = evaluate(model, examples, batch_size, deterministic=deterministic, samples=samples, seed=seed,
                   progress=progress, draw_sets=draw_sets)
    metrics = {k: res[k] for k in ("accuracy", "balanced_accuracy", "confusion", "auc", "draw_sets", "uncertain",
                                   "uncertain_error", "confident_error") if k in res}
    metrics.update(images=len(examples), classes=classes, hit_rate=res["hit_rate"], images_hit=res["images_hit"])
    return metrics


def probe_run(run_dir: str | Path, manifest: str | Path, per_image: int = 4, seed: int = 0,
              device: str = "cpu", progress: bool = False, which: str = "best") -> dict:
    """What a run's ``f`` and ``g`` (its ``best`` or ``last`` checkpoint) call single
    sub-tiles on and off the objects of a manifest with masks (:func:`zoomnet.probe.probe`)."""
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
