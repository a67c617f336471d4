"""Cost of one training step of a preset (``zoomnet.train.training_step``, the step of
``zoomnet train``): tensor operations and seconds.

Runs the preset's model in training mode on in-memory images of the preset's size (random
pixels: the cost does not depend on content, only on how many distinct tiles and sub-tiles
the draws reach, so the draws use the untrained attention), one batch of the preset's
batch size, and counts the operations the PyTorch profiler records (also without the
operations that only make views, such as cutting each box out of its image) and the wall
time of a step (median of ``--repeats`` steps). Writes one row per preset to
``docs/experiments/training-step/training_step.csv`` (``--csv``).

    python benchmarks/training_step.py                      # megapixel-mnist, colon-cancer
    python benchmarks/training_step.py tiny-objects --threads 2
    python benchmarks/training_step.py --dispatch           # ops dispatched against N and B

Each row also gives the allocator setting (``zoomnet.runtime.allocator``: the steady
thresholds every command sets, or what training applies where ``ZOOMNET_MALLOC=1`` is set),
the page faults and the system time per step.

``--dispatch`` counts the tensor operations dispatched (a ``TorchDispatchMode``: what reaches
the kernels, views included) by one training step, forward and backward, of the
``needle-camelyon`` preset at N = 10, 50, 200 draws and batches of 1 and 8
(``docs/experiments/training-step/dispatch.csv``): with each net in one call, as on a GPU
(``ops``), and in the heap-sized chunks of training on a CPU (``ops_cpu_chunks``;
``zoomnet.model.chunks``).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from _results import write_rows
from zoomnet.config import load_config
from zoomnet.data.examples import Example
from zoomnet.model import build_model
from zoomnet.model import chunks as chunks_module
from zoomnet.runtime.allocator import reuse_freed_memory, settle_heap
from zoomnet.sources import ArraySource
from zoomnet.train import make_optimizer, training_step

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"megapixel-mnist": (1500, 1500), "colon-cancer": (500, 500), "tiny-objects": (512, 512),
         "needle-camelyon": (1024, 1024), "traffic-signs": (960, 1280)}


# operations that only make views of existing memory (cutting boxes out of an image, reshaping)
VIEWS = {"as_strided", "slice", "select", "view", "reshape", "expand", "unsqueeze", "squeeze", "permute",
         "t", "transpose", "alias", "unfold", "narrow", "as_strided_", "detach", "_reshape_alias", "resolve_conj"}


def _batch(preset: str, overrides: list[str], batch_size: int | None = None):
    """The preset's config and one batch of random images of its size."""
    config = load_config(preset, overrides)
    config.train.reference_class = None if config.model.num_classes > 2 else 0
    h, w = SIZES[preset]
    rng = np.random.default_rng(0)
    batch = [Example(ArraySource(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), i % config.model.num_classes, None,
                     f"img{i}") for i in range(batch_size or config.train.batch_size)]
    return config, batch


def step_cost(preset: str, repeats: int) -> dict:
    """Operations and seconds of the training step of ``zoomnet train`` (the contrastive
    term on), after a warm-up step."""
    allocator = "reuse freed" if reuse_freed_memory() else "steady thresholds" if settle_heap() else "default"
    config, batch = _batch(preset, [])
    torch.manual_seed(0)
    model = build_model(config.model).train()
    optimizer = make_optimizer(model, config.train)
    generator = torch.Generator().manual_seed(0)

    def one():
        return training_step(model, batch, config.train, optimizer, generator, contrastive=True)[0]

    one()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = one()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ops = sum(e.count for e in events)
    views = sum(e.count for e in events if e.key.split("::")[1] in VIEWS)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        tick = time.perf_counter()
        one()
        times.append(time.perf_counter() - tick)
    after = resource.getrusage(resource.RUSAGE_SELF)
    step = statistics.median(times)
    return {
        "preset": preset, "batch": len(batch), "sub_tiles": int(out.leaf_features.shape[0]),
        "aten_ops": ops, "ops_without_views": ops - views, "ops_per_image": round(ops / len(batch)),
        "step_s": round(step, 3), "images_per_s": round(len(batch) / step, 2),
        "allocator": allocator, "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / repeats),
        "system_s_per_step": round((after.ru_stime - before.ru_stime) / repeats, 2),
    }


def dispatched_ops(preset: str, n: int, batch_size: int, chunks: bool = True) -> int:
    """Tensor operations dispatched by one training step (forward, loss, backward, update),
    after a warm-up step (which fills the caches: the contrast prior's neighbourhood counts,
    the nets' widest layer per input size). ``chunks=False`` runs each net in one call, as
    training does on a GPU; otherwise in the heap-sized chunks of training on a CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    config, batch = _batch(preset, [f"model.train_samples={n}"], batch_size)
    torch.manual_seed(0)
    model = build_model(config.model).train()
    optimizer = make_optimizer(model, config.train)
    generator = torch.Generator().manual_seed(0)
    counter = Count()
    saved = chunks_module.HEAP_BLOCK_BYTES
    chunks_module.HEAP_BLOCK_BYTES = saved if chunks else 0
    try:
        for counted in (False, True):
            with counter if counted else contextlib.nullcontext():
                training_step(model, batch, config.train, optimizer, generator)
    finally:
        chunks_module.HEAP_BLOCK_BYTES = saved
    return counter.n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="*", default=["megapixel-mnist", "colon-cancer"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--dispatch", action="store_true", help="ops dispatched against N and B (needle-camelyon)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.dispatch:
        rows = [{"preset": "needle-camelyon", "draws": n, "batch": b,
                 "ops": (ops := dispatched_ops("needle-camelyon", n, b, chunks=False)), "ops_per_image": round(ops / b),
                 "ops_cpu_chunks": dispatched_ops("needle-camelyon", n, b)} for n in (10, 50, 200) for b in (1, 8)]
        for row in rows:
            print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        write_rows(args.csv or ROOT / "docs/experiments/training-step/dispatch.csv", [], rows)
        return
    args.csv = args.csv or str(ROOT / "docs/experiments/training-step/training_step.csv")
    rows = []
    for preset in args.presets:
        row = step_cost(preset, args.repeats)
        rows.append(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    write_rows(args.csv, [f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{args.threads} threads"], rows)

if __name__ == "__main__":
    main()
