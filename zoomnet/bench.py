"""``zoomnet bench SETTING [--skip-training] [--seeds 3]``: the paper's Table 1 columns,
measured in one harness, for Zoom-In, ATS (lazy source), ATS as published (holding the
full-resolution image), a CNN on the full-resolution image and a CNN on a downsampled one.

With ``--skip-training``: cost columns with untrained weights (seed 0) on one image; cost
does not depend on the weights, except Zoom-In's through how many tiles its attention
visits. Otherwise the setting's synthetic set is written, ``zoomin``, ``ats`` and
``cnn-downsampled`` are trained for each seed (runs reused when finished), tested
(accuracy, localization), and the cost columns are measured with the seed-0 weights on test
images. Results and commands: ``docs/benchmarks.md``.

Methods:
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one inference, plus the additions
  of cell pooling and of the contrast prior's box filter by formula (``count_pooling_flops``:
  pooling is linear-time ``index_add`` and the box filter running sums, which the counter
  does not see); ``attention_flops`` is everything except the feature net ``f`` and the
  classifier ``g``.
- Peak memory: :class:`PeakTensorMemory`, the peak of the bytes held by live tensor storages
  created during the inference (weights excluded: they exist before). Every input tensor a
  method holds counts: ``ats-fullres`` and the CNNs hold the image as a tensor; Zoom-In and
  ATS read through a lazy source, whose crops count once they are tensors. On CUDA
  ``torch.cuda.max_memory_allocated`` would be the equivalent.
- Time: two warm-up runs, then the median of repeated runs; the torch thread count is
  printed. Training speed: one warm-up batch, then four timed batches, same process.
- Localization: share of images with objects where a sampled sub-tile overlaps one, and
  Spearman's rho between sampled sub-tiles' attention probability and object coverage.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import sys
import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from zoomnet.core.geometry import count_pooling_flops
from zoomnet.errors import UserError
from zoomnet.sources.held import HeldSource, NumpySource

MODELS = ["zoomin", "ats", "ats-fullres", "cnn", "cnn-downsampled"]
COLUMNS = ["model", "accuracy", "accuracy_std", "flops", "attention_flops", "peak_memory_mb", "ms_per_image",
           "train_images_per_s", "images_hit", "spearman"]


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once among those created inside the block.

    Each op's outputs are registered by storage; a storage is released when the last tensor
    object seen for it is garbage-collected. Tensors that existed before the block
    (weights), views of them, and storages made outside torch's dispatcher
    (``torch.from_numpy``) are not counted, while everything computed from them is.

    >>> with PeakTensorMemory() as m:
    ...     a = torch.zeros(1000)            # 4000 bytes
    ...     b = torch.zeros(2000); del a     # 8000 + 4000 alive at once, then 8000
    ...     c = torch.zeros(500)             # 8000 + 2000
    >>> m.peak
    12000
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage pointer -> live tensor objects
        self._sizes: dict[int, int] = {}

    def _release(self, ptr: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            self.current -= self._sizes.pop(ptr)
            del self._refs[ptr]

    def _track(self, t: torch.Tensor, aliases_input: bool) -> None:
        st = t.untyped_storage()
        ptr, size = st.data_ptr(), st.nbytes()
        if ptr == 0 or size == 0:
            return
        if ptr not in self._refs:
            if aliases_input:  # a view of a tensor from before the block (a weight): not ours
                return
            self._refs[ptr] = 0
            self._sizes[ptr] = size
            self.current += size
            self.peak = max(self.peak, self.current)
        self._refs[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = getattr(func, "_schema", None)
        aliases = bool(schema and any(r.alias_info is not None for r in schema.returns))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                self._track(t, aliases)
        return out


@dataclass
class Setting:
    """A benchmark setting: image size, the Zoom-In preset, ATS's and the small CNN's scales,
    and for trained rows the synthetic set (``make-data`` kind), its size and the epochs."""

    size: int
    preset: str | None
    ats_scale: float
    cnn_scale: float
    image: str
    data: str | None = None
    num: int = 0
    epochs: int = 0
    train: tuple[str, ...] = ()  # overrides of the preset's training for the bench's short runs


SETTINGS = {
    # costs with the authors' LeNet (the paper's colon figures); the preset trains a narrower,
    # max-pooled one, which learns tiny objects faster (docs/benchmarks.md, stand-ins)
    "colon-cancer": Setting(500, "colon-cancer", 0.2, 0.2, "tiny", train=("model.feature_kwargs={}",)),
    "needles": Setting(1024, "needle-camelyon", 0.5, 0.25, "needles", "needles", 400, 6, ("train.contrastive_from=4",)),
    # smaller, fainter lesions among lone nuclei: where masks can add accuracy (point of the paper's Table 2)
    "needles-hard": Setting(1024, "needle-camelyon", 0.5, 0.25, "needles-hard", "needles-hard", 400, 6, ("train.contrastive_from=4",)),
    # ten classes and no negative class: the ATS paper's objective (cross-entropy, entropy term)
    "megapixel-mnist": Setting(1500, None, 0.12, 0.12, "mnist", "megapixel-mnist", 400, 8, (
        "train.contrastive_from=null", "model.train_samples=40", "train.attention_lr=0.01")),
}
TRAINED = ("zoomin", "ats", "cnn-downsampled")  # the full-resolution CNN: cost only on a CPU


def setting_config(name: str, kind: str, overrides: list[str] | None = None):
    """The run configuration of one model of a setting (2 classes; 10 for MNIST), with
    ``--set`` style overrides applied before the model kind is switched."""
    from zoomnet.config import apply_overrides, config_from_dict, defaults, load_config

    s = SETTINGS[name]
    if s.preset:
        config = load_config(s.preset)
    else:  # Megapixel MNIST: ATS's view scale (s2 = s) and patches; Zoom-In's level 1 at half that
        data = defaults()
        data["model"].update(levels=[
            {"scale": 0.06, "region": [300, 300], "stride": "tiled"},
            {"scale": 0.12, "region": [50, 50], "stride": "dense"},
        ], samples=10, num_classes=10)
        data["ats_scale"] = 0.12
        config = config_from_dict(data)
    data = apply_overrides(config.to_dict(), [*s.train, *(overrides or [])])
    data["ats_scale"] = s.ats_scale
    if kind in ("ats", "ats-fullres"):
        data["model"]["kind"] = "ats"
    elif kind in ("cnn", "cnn-downsampled"):
        data["model"]["kind"] = "cnn"
        data["model"]["cnn_scale"] = 1.0 if kind == "cnn" else s.cnn_scale
    return config_from_dict(data, f"bench {name}")


def bench_image(name: str, seed: int = 0) -> np.ndarray:
    """One image of the setting's kind (uint8 RGB)."""
    s = SETTINGS[name]
    rng = np.random.default_rng(seed)
    if s.image == "tiny":
        from zoomnet.data.synthetic import TinyObjects, make_tiny_objects

        return make_tiny_objects(1, TinyObjects(size=s.size), seed=seed, positive_fraction=1.0)[0].source.image.permute(1, 2, 0).numpy()
    if s.image in ("needles", "needles-hard"):
        from zoomnet.data.writers import histology_texture, needles_image

        return needles_image(rng, histology_texture(), s.size, True, hard=s.image == "needles-hard")[0]
    from zoomnet.data.writers import megapixel_mnist_image, mnist_digits

    digits, labels = mnist_digits()
    img, _ = megapixel_mnist_image(rng, digits, labels, np.arange(len(labels)), s.size, 3)
    return np.repeat(img[..., None], 3, axis=2)


def measure(name: str, kind: str, repeats: int = 5, model: torch.nn.Module | None = None,
            images: list[np.ndarray] | None = None, overrides: list[str] | None = None) -> dict:
    """FLOPs, attention FLOPs, peak memory and time per image of one model.

    Untrained weights (seed 0) on the setting's bench image unless ``model`` and ``images``
    are given; over several images FLOPs and memory are means, time the median of all runs.
    """
    from zoomnet.model import build_model

    config = setting_config(name, kind, overrides)
    if model is None:
        torch.manual_seed(0)
        model = build_model(config.model)
    model = model.eval()
    images = images if images is not None else [bench_image(name)]
    held = kind in ("ats-fullres", "cnn", "cnn-downsampled")
    flops, attention, peaks, times = [], [], [], []
    for i, image in enumerate(images):
        lazy = None if held else NumpySource(image, scales=tuple(level.scale for level in config.model.levels))

        def run(counted: bool = False):  # the held image is made inside: it is memory the method holds
            src = HeldSource(image) if held else lazy
            if counted:  # predict's own computation under no_grad: inference mode would show the
                # counter composite operations whole, not the temporaries inside them
                with torch.no_grad():
                    return model([src], generator=torch.Generator().manual_seed(i))
            return model.predict([src], generator=torch.Generator().manual_seed(i))

        with FlopCounterMode(display=False) as fc, count_pooling_flops() as pooling:
            run()
        counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
        flops.append(fc.get_total_flops() + pooling[0])  # the counter sees no index_add, no running sums: by formula
        attention.append(flops[-1] - counts.get("ZoomIn.feature", 0) - counts.get("ZoomIn.classifier", 0))
        with PeakTensorMemory() as mem:
            run(counted=True)
        peaks.append(mem.peak)
        for _ in range(2 if i == 0 else 1):
            run()
        for _ in range(repeats):
            tick = time.perf_counter()
            run()
            times.append((time.perf_counter() - tick) * 1000)
    row = {"model": kind, "flops": round(statistics.mean(flops))}
    if not kind.startswith("cnn"):
        row["attention_flops"] = round(statistics.mean(attention))
    row["peak_memory_mb"] = round(statistics.mean(peaks) / 2**20, 3)
    row["ms_per_image"] = round(statistics.median(times), 2)
    return row


def evaluate_trained(model: torch.nn.Module, examples, batch_size: int = 8, seed: int = 0) -> dict:
    """Accuracy, and where masks are known, the share of images with objects where a sampled
    sub-tile overlaps one (``images_hit``) and Spearman's rho between sampled sub-tiles'
    attention probability and object coverage (``zoomnet.train.evaluate``)."""
    from zoomnet.train import evaluate

    res = evaluate(model, examples, batch_size, seed=seed, localization=True)
    row = {"accuracy": res["accuracy"]}
    if res["images_with_objects"]:
        row.update(images_hit=res["images_hit"], spearman=res["spearman"])
    return row


def train_speed(model: torch.nn.Module, config, examples, batches: int = 4) -> float:
    """Training images per second of a copy of ``model``: one warm-up batch, then ``batches``
    timed batches of the last epoch's objective (contrastive term on where configured)."""
    import copy

    from zoomnet.train import make_optimizer, train_epoch

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
    from zoomnet.runs import train_run

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


def run_trained(name: str, models: list[str], seeds: int, work: Path, overrides: list[str], epochs: int | None,
                num: int | None, size: int | None, repeats: int, cost_images: int, progress: bool) -> list[dict]:
    """Train each trainable model for ``seeds`` seeds on the setting's synthetic set, test it,
    and measure the cost columns with the trained seed-0 weights on test images."""
    from PIL import Image

    from zoomnet.data.manifest import load_examples
    from zoomnet.data.writers import write_dataset
    from zoomnet.runs import load_run

    s = SETTINGS[name]
    if s.data is None:
        raise UserError(f"bench {name}: there is no data set to train on here (the real set cannot be "
                        "downloaded); add --skip-training for FLOPs, memory and time")
    epochs = epochs or s.epochs
    size = size or s.size
    data = work / f"data-{num or s.num}-{size}"
    if not (data / "test.csv").is_file():
        print(f"# writing the {s.data} set to {data}", file=sys.stderr)
        write_dataset(s.data, data, num=num or s.num, size=size, seed=0)
    tag = hashlib.sha1(json.dumps([overrides, epochs, str(data)]).encode()).hexdigest()[:8]
    test_rows = list(csv.DictReader((data / "test.csv").open()))[:cost_images]
    images = [np.asarray(Image.open(data / r["path"]).convert("RGB")) for r in test_rows]
    tested: dict[str, tuple] = {}  # ats-fullres is the ats models holding the image: tested once
    rows = []
    for kind in models:
        row = {"model": kind}
        source_kind = "ats" if kind == "ats-fullres" else kind
        if source_kind in TRAINED:
            if source_kind not in tested:
                local = []
                for seed in range(seeds):
                    run = work / "runs" / tag / f"{source_kind}-seed{seed}"
                    _train_one(name, source_kind, seed, data, run, overrides, epochs, progress)
                    model, config = load_run(run, "cpu")
                    test = load_examples(data / "test.csv", config.data.classes, config.data.fill, "evaluated")
                    local.append(evaluate_trained(model, test, config.train.batch_size, seed=seed))
                    if seed == 0:
                        first = (model, config)
                tested[source_kind] = (local, *first)
            local, trained, train_config = tested[source_kind]
            accs = [r["accuracy"] for r in local]
            row["accuracy"] = round(statistics.mean(accs), 4)
            row["accuracy_std"] = round(statistics.stdev(accs), 4) if len(accs) > 1 else ""
            if kind != "ats-fullres":
                train = load_examples(data / "train.csv", train_config.data.classes, train_config.data.fill, "training")
                row["train_images_per_s"] = round(train_speed(trained, train_config, train), 2)
            if "spearman" in local[0]:
                row["images_hit"] = round(statistics.mean(r["images_hit"] for r in local), 4)
                row["spearman"] = round(statistics.mean(r["spearman"] for r in local), 4)
        else:
            trained = None  # the full-resolution CNN: cost only
        row.update(measure(name, kind, repeats, model=trained, images=images, overrides=overrides))
        rows.append(row)
    return rows


def print_rows(rows: list[dict], header: list[str], out: str | None = None) -> None:
    """Comment lines, then the CSV; the same text to ``out`` if given."""
    lines = [f"# {h}" for h in header] + [",".join(COLUMNS)]
    lines += [",".join("" if row.get(c) is None else str(row.get(c, "")) for c in COLUMNS) for row in rows]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def run_bench(name: str, models: list[str] | None = None, repeats: int = 5, skip_training: bool = True,
              seeds: int = 3, work: str | Path = "bench-runs", overrides: list[str] | None = None,
              epochs: int | None = None, num: int | None = None, size: int | None = None,
              cost_images: int = 8, out: str | None = None, progress: bool = True) -> list[dict]:
    """Measure every model of a setting; print CSV (comment lines first) and return the rows."""
    if name not in SETTINGS:
        raise UserError(f"bench {name}: unknown setting; choose one of: {', '.join(SETTINGS)}")
    models = models or MODELS
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise UserError(f"bench --models {unknown[0]}: unknown model; choose from {', '.join(MODELS)}")
    overrides = list(overrides or [])
    torch.manual_seed(0)
    if skip_training:
        rows = [measure(name, kind, repeats, overrides=overrides) for kind in models]
        what = "untrained weights, seed 0, one image"
    else:
        rows = run_trained(name, models, seeds, Path(work) / name, overrides, epochs, num, size, repeats,
                           cost_images, progress)
        s = SETTINGS[name]
        what = (f"trained: {num or s.num} synthetic images ({s.data}, 60/20/20 split), {epochs or s.epochs} epochs, "
                f"{seeds} seed(s), best validation epoch; accuracy = test mean over seeds; cost columns: "
                f"seed-0 weights, mean over {cost_images} test images; cnn (full resolution) untrained; "
                "ats-fullres = the ats models holding the image; "
                "train_images_per_s: seed-0 weights, 4 timed batches after one warm-up, one process")
    size = size or SETTINGS[name].size
    header = [f"setting: {name}, {size}x{size}; {what}" + (f"; --set {' '.join(overrides)}" if overrides else ""),
              f"machine: {platform.platform()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads"]
    print_rows(rows, header, out)
    return rows
