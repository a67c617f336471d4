"""Cost of one training step of a preset: tensor operations and seconds, by phase.

Runs the preset's model in training mode on in-memory images of the preset's size (random
pixels: the cost does not depend on content, only on how many distinct tiles and sub-tiles
the draws reach, so the draws use the untrained attention), one batch of the preset's
batch size, and counts the operations the PyTorch profiler records (forward, loss and
backward; also without the operations that only make views, such as cutting each box
out of its image) and the wall time of each phase (median of ``--repeats`` steps). Writes one row
per preset to ``docs/benchmarks/training_step.csv`` (``--csv``).

    python benchmarks/training_step.py                      # megapixel-mnist, colon-cancer
    python benchmarks/training_step.py tiny-objects --threads 2
    python benchmarks/training_step.py --dispatch           # ops dispatched against N and B

Each row also gives the allocator setting (``zoomnet.allocator``: the steady thresholds a
model sets when built, or what training applies where ``ZOOMNET_MALLOC=1`` is set), the
page faults and the system time per step.

``--dispatch`` counts the tensor operations dispatched (a ``TorchDispatchMode``: what reaches
the kernels, views included) by one training step, forward and backward, of the
``needle-camelyon`` preset at N = 10, 50, 200 draws and batches of 1 and 8
(``docs/benchmarks/dispatch.csv``): with each net in one call, as on a GPU (``ops``), and in
the heap-sized chunks of training on a CPU (``ops_cpu_chunks``; ``zoomnet.allocator``).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import zoomnet
from _results import write_rows
from zoomnet.config import load_config
from zoomnet.data.examples import Example
from zoomnet.model import build_model
from zoomnet.sources import ArraySource
from zoomnet.train import make_optimizer, training_loss

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"megapixel-mnist": (1500, 1500), "colon-cancer": (500, 500), "tiny-objects": (512, 512),
         "needle-camelyon": (1024, 1024), "traffic-signs": (960, 1280)}


# operations that only make views of existing memory (cutting boxes out of an image, reshaping)
VIEWS = {"as_strided", "slice", "select", "view", "reshape", "expand", "unsqueeze", "squeeze", "permute",
         "t", "transpose", "alias", "unfold", "narrow", "as_strided_", "detach", "_reshape_alias", "resolve_conj"}


def step_cost(preset: str, repeats: int) -> dict:
    allocator = "default"  # a checkout from before zoomnet.allocator: glibc's allocator as it comes
    if (Path(zoomnet.__file__).parent / "allocator.py").is_file():  # (an editable install would find ours)
        from zoomnet.allocator import reuse_freed_memory

        if reuse_freed_memory():  # what train_epoch does first (where ZOOMNET_MALLOC=1 is set)
            allocator = "reuse freed"
        else:
            import zoomnet.allocator as heap

            if getattr(heap, "settle_heap", lambda: False)():  # what building a model does
                allocator = "steady thresholds"
    config = load_config(preset)
    config.train.reference_class = None if config.model.num_classes > 2 else 0
    h, w = SIZES[preset]
    rng = np.random.default_rng(0)
    batch = [
        Example(ArraySource(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), i % config.model.num_classes, None, f"img{i}")
        for i in range(config.train.batch_size)
    ]
    labels = torch.tensor([e.label for e in batch])
    torch.manual_seed(0)
    model = build_model(config.model).train()
    optimizer = make_optimizer(model, config.train)
    generator = torch.Generator().manual_seed(0)

    def one(times: list | None = None):
        t0 = time.perf_counter()
        out = model([e.source for e in batch], generator=generator, contrastive=True)
        t1 = time.perf_counter()
        loss, _ = training_loss(model, out, batch, labels, config.train, True)
        t2 = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        t3 = time.perf_counter()
        if times is not None:
            times.append((t1 - t0, t2 - t1, t3 - t2))
        return out

    one()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = one()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ops = sum(e.count for e in events)
    views = sum(e.count for e in events if e.key.split("::")[1] in VIEWS)
    times: list = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        one(times)
    after = resource.getrusage(resource.RUSAGE_SELF)
    fwd, loss, bwd = (statistics.median(t[i] for t in times) for i in range(3))
    return {
        "preset": preset, "batch": len(batch), "sub_tiles": int(out.leaf_features.shape[0]),
        "aten_ops": ops, "ops_without_views": ops - views, "ops_per_image": round(ops / len(batch)),
        "forward_s": round(fwd, 3), "loss_s": round(loss, 3), "backward_s": round(bwd, 3),
        "step_s": round(fwd + loss + bwd, 3), "images_per_s": round(len(batch) / (fwd + loss + bwd), 2),
        "allocator": allocator, "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / repeats),
        "system_s_per_step": round((after.ru_stime - before.ru_stime) / repeats, 2),
    }


def dispatched_ops(preset: str, n: int, batch_size: int, chunks: bool = True) -> int:
    """Tensor operations dispatched by one training step (forward, loss, backward), after a
    warm-up step (which fills the caches: the contrast prior's neighbourhood counts, the
    nets' widest layer per input size). ``chunks=False`` runs each net in one call, as
    training does on a GPU; otherwise in the heap-sized chunks of training on a CPU (a
    checkout from before those chunks runs as it comes)."""
    try:
        import zoomnet.allocator as allocator
    except ImportError:  # a checkout from before zoomnet.allocator
        allocator = None
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    config = load_config(preset, [f"model.train_samples={n}"])
    h, w = SIZES[preset]
    rng = np.random.default_rng(0)
    batch = [Example(ArraySource(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), i % 2, None, f"img{i}")
             for i in range(batch_size)]
    labels = torch.tensor([e.label for e in batch])
    torch.manual_seed(0)
    model = build_model(config.model).train()
    generator = torch.Generator().manual_seed(0)
    counter = Count()
    saved = getattr(allocator, "HEAP_BLOCK_BYTES", None) if allocator else None
    if saved is not None:
        allocator.HEAP_BLOCK_BYTES = saved if chunks else 0
    try:
        for counted in (False, True):
            with counter if counted else contextlib.nullcontext():
                out = model([e.source for e in batch], generator=generator)
                loss, _ = training_loss(model, out, batch, labels, config.train, False)
                loss.backward()
    finally:
        if saved is not None:
            allocator.HEAP_BLOCK_BYTES = saved
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
        write_rows(args.csv or ROOT / "docs/benchmarks/dispatch.csv", [], rows)
        return
    args.csv = args.csv or str(ROOT / "docs/benchmarks/training_step.csv")
    rows = []
    for preset in args.presets:
        row = step_cost(preset, args.repeats)
        rows.append(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    write_rows(args.csv, [f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{args.threads} threads, commit {commit}"], rows)

if __name__ == "__main__":
    main()
