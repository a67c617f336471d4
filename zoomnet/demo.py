"""The demo: synthetic tiny objects, generated in memory, a 2-level Zoom-In network trained on
the CPU, held-out accuracy, and pictures of where it looked.

Images are 512x512 with 24-32 px objects; an image is positive iff it holds a ring, and
every image holds filled discs of the same colour and size, so the label needs the
full-resolution sub-tiles. ``demo_config`` says which settings and why. ``zoomnet demo`` (and
``make demo``) runs ``zoomnet.cli.run_cli_demo``, the same job through the command line;
:func:`run_demo` does it in memory through the Python API.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from zoomnet.checkpoint import save_checkpoint
from zoomnet.data.synthetic import TinyObjects, make_tiny_objects
from zoomnet.heatmap import render_batch
from zoomnet.model import ZoomIn
from zoomnet.train import evaluate, fit


def demo_config(epochs: int | None = None, seed: int = 0):
    """The ``tiny-objects`` preset: a 2-level model and CPU-friendly optimisation.

    Level 1 looks at the 512 px image at 1/8 (64x64 view) and picks among 4x4 tiles of
    128 px; level 2 looks at a tile at 1/2 (64x64 view) and picks 64 px sub-tiles on an
    8 px stride (overlapping, so some sub-tile holds an object whole). Training takes 64
    draws, inference 16: with near-uniform attention, 64 draws hit a given object about
    twice per image (expected hits ~ N (object + sub-tile)^2 / image^2; aim for >= 1), and
    the estimator is unbiased for any N. The feature net is the authors' LeNet with a
    stride-2 stem (a quarter of the cost) and global max pooling (a ring anywhere in the
    sub-tile counts). From the first epoch the instance loss trains ``f`` on the sampled
    sub-tiles themselves and attention distillation teaches attention where ``f`` found
    something; the contrastive term joins once attention has moved (epoch 6: from the
    start it fights the cross-entropy while samples are still random). See
    docs/design.md, "Training dynamics".
    """
    from zoomnet.config import load_config

    config = load_config("tiny-objects")
    if epochs is not None:
        config.train.epochs = epochs
    config.train.seed = seed
    return config


def run_demo(out_dir: str | Path = "demo-output", train_size: int = 320, epochs: int | None = None, seed: int = 0,
             heatmaps: int = 4, val_size: int = 100, test_size: int = 200, log=print,
             progress: bool = True) -> dict:
    """Generate, train, evaluate, draw. Returns the test metrics."""
    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_dir = Path(out_dir)
    settings = TinyObjects(targets=(1, 3))  # as `zoomnet make-data tiny-objects`
    log(f"generating {train_size} training, {val_size} validation and {test_size} test images "
        f"of {settings.size}x{settings.size} ...")
    train = make_tiny_objects(train_size, settings, seed=seed * 3 + 1)
    val = make_tiny_objects(val_size, settings, seed=seed * 3 + 2)
    test = make_tiny_objects(test_size, settings, seed=seed * 3 + 3)
    config = demo_config(epochs, seed)
    torch.manual_seed(seed)
    model = ZoomIn(config.model)
    log(f"training a 2-level Zoom-In network for {config.train.epochs} epochs on the CPU ...")
    fit(model, train, val, config.train, log=log, progress=progress)
    save_checkpoint(model, out_dir / "model.safetensors", {"epochs": epochs, "seed": seed})
    det = evaluate(model, test, deterministic=True)
    sampled = evaluate(model, test, deterministic=False, seed=seed)
    log(f"test: sampling accuracy {sampled['accuracy']:.3f}, sub-tiles on a ring {sampled['hit_rate']:.1%}, "
        f"positive images with a ring found {sampled['images_hit']:.1%}")
    log(f"accuracy: {det['accuracy']:.2f}")
    picks = [i for i, ex in enumerate(test) if ex.label == 1][: (heatmaps + 1) // 2]
    picks += [i for i, ex in enumerate(test) if ex.label == 0][: heatmaps // 2]
    batch = [test[i] for i in picks]
    out = model.predict([ex.source for ex in batch], deterministic=True)
    probs = torch.softmax(out.logits, dim=1)[:, 1].tolist()
    titles = [f"{ex.name}: label {'ring' if ex.label else 'no ring'}, p(ring) = {p:.2f}" for ex, p in zip(batch, probs)]
    paths = render_batch(model, [ex.source for ex in batch], out, [out_dir / f"{ex.name}.png" for ex in batch], titles)
    for p in paths:
        log(f"heatmap: {p}")
    log(f"done in {time.perf_counter() - start:.0f} s")
    return {"accuracy": det["accuracy"], "sampling_accuracy": sampled["accuracy"], "hit_rate": sampled["hit_rate"]}
