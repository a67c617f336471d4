"""GPU figures: inference, training steps and a gigapixel slide on CUDA, in one run.

Nothing in zoomnet depends on a GPU; this script measures what one gives. On the machine it
runs on, for float32 and for bfloat16 autocast (the nets only; the estimator stays float32):

- ``inference``: each bench setting (``zoomnet.bench.SETTINGS``: colon-cancer, needles,
  megapixel-mnist) and model (``zoomin``, ``ats``), untrained weights (seed 0), the bench
  image through the lazy source: milliseconds per image (median of ``--repeats`` runs after
  two warm-ups, ``torch.cuda.synchronize`` around each) and the peak of CUDA memory above
  what was allocated before the run (``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``); also images/s for batches of 8 and 64 (``predict --batch``).
- ``train``: one training step (forward, loss, backward, optimiser) of a preset at a batch
  size and draw count, on random pixels: seconds per step and images/s, median of
  ``--repeats`` steps. The same steps on the machine's CPU (all its cores) give the ratio.
  The ``fmow`` row is a 700x1100 image under 500 px tiles, so it runs the path of tiles that
  stick out of the image (cells left out of the maps, tile views that repeat the edge).
- ``diagnose``: where the time of a ``needle-camelyon`` training step (N = 200, B = 8) goes:
  the step with draws that repeat (the same shapes every step), with each net's rows not
  padded to a few counts (``zoomnet.model.chunks.padded``), with cuDNN off, and the
  profiler's self time on the host and on the device (the tables go to the log).
- ``gigapixel``: ``predict_images`` of an untrained ``camelyon16`` run (Zoom-In and ATS) on a
  slide written by ``zoomnet make-data gigapixel`` (``--slide-size``), on CUDA: seconds
  (second call) and peak CUDA memory.

    python benchmarks/gpu.py --out docs/experiments/gpu/gpu.csv --slide-size 25000

Every row is printed as it is measured; a row that fails prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import untrained_run, write_rows  # noqa: E402
from zoomnet.runtime.allocator import reuse_freed_memory  # noqa: E402
from zoomnet.bench import SETTINGS, bench_image, setting_config  # noqa: E402
from zoomnet.config import load_config  # noqa: E402
from zoomnet.data.examples import Example  # noqa: E402
from zoomnet.model import build_model  # noqa: E402
from zoomnet.model import chunks  # noqa: E402
from zoomnet.sources import ArraySource  # noqa: E402
from zoomnet.sources.held import NumpySource  # noqa: E402
from zoomnet.train import make_optimizer, training_step  # noqa: E402

CUDA = torch.device("cuda")  # replaced by --device (cpu: a dry run of the script, no memory figures)
TRAIN_SIZES = {"needle-camelyon": (1024, 1024), "megapixel-mnist": (1500, 1500), "colon-cancer": (500, 500),
               "fmow": (700, 1100)}  # fmow: its 500 px tiles stick out of the image (cells_in_image, edge repeat)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; the bytes allocated now."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_mb(device: torch.device, base: int = 0):
    if device.type != "cuda":
        return ""
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)


def timed(fn, device: torch.device, repeats: int, warmups: int = 2) -> float:
    """Median seconds of ``fn`` after warm-ups."""
    for _ in range(warmups):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def inference_row(name: str, kind: str, precision: str, repeats: int) -> dict:
    config = setting_config(name, kind)
    torch.manual_seed(0)
    model = build_model(config.model).to(CUDA).eval()
    image = bench_image(name)
    source = NumpySource(image, scales=tuple(level.scale for level in config.model.levels))
    seed = iter(range(10**6))

    def run(batch: int = 1):
        with autocast(CUDA, precision):
            return model.predict([source] * batch, generator=torch.Generator().manual_seed(next(seed)))

    run()
    base = reset_peak(CUDA)
    run()
    peak = peak_mb(CUDA, base)
    ms = timed(run, CUDA, repeats) * 1000
    batch_s = timed(lambda: run(8), CUDA, max(repeats // 2, 2), warmups=1)
    wide_s = timed(lambda: run(64), CUDA, max(repeats // 4, 2), warmups=1)  # predict --batch 64
    return {"part": "inference", "setting": name, "model": kind, "precision": precision, "device": CUDA.type,
            "ms_per_image": round(ms, 2), "images_per_s": round(8 / batch_s, 1),
            "images_per_s_batch64": round(64 / wide_s, 1), "peak_cuda_mb": peak}


def train_row(preset: str, draws: int | None, batch: int, precision: str, device: torch.device, repeats: int) -> dict:
    reuse_freed_memory()  # as train_run does: where ZOOMNET_MALLOC=1 is set
    overrides = [f"model.train_samples={draws}"] if draws else []
    config = load_config(preset, overrides)
    config.train.reference_class = None if config.model.num_classes > 2 else 0
    h, w = TRAIN_SIZES[preset]
    rng = np.random.default_rng(0)
    examples = [Example(ArraySource(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), i % config.model.num_classes,
                        None, f"img{i}") for i in range(batch)]
    torch.manual_seed(0)
    model = build_model(config.model).to(device).train()
    optimizer = make_optimizer(model, config.train)
    generator = torch.Generator().manual_seed(0)

    def step():  # the training step of `zoomnet train`
        training_step(model, examples, config.train, optimizer, generator, contrastive=True,
                      autocast=precision == "bf16")

    reset_peak(device)
    seconds = timed(step, device, repeats, warmups=1)
    row = {"part": "train", "setting": preset, "model": f"zoomin N={config.model.train_samples} B={batch}",
           "precision": precision, "device": device.type, "ms_per_image": round(seconds * 1000 / batch, 1),
           "images_per_s": round(batch / seconds, 2), "peak_cuda_mb": peak_mb(device)}
    return row


def diagnose(preset: str, draws: int, batch: int, repeats: int) -> list[dict]:
    """Where a training step's time goes on the device: the profiler's top operations, and
    the step timed with draws that repeat (same shapes every step), with cuDNN off."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for precision in ("fp32", "bf16"):
        config = load_config(preset, [f"model.train_samples={draws}"])
        config.train.reference_class = 0
        h, w = TRAIN_SIZES[preset]
        rng = np.random.default_rng(0)
        examples = [Example(ArraySource(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), i % 2, None, f"img{i}")
                    for i in range(batch)]
        torch.manual_seed(0)
        model = build_model(config.model).to(CUDA).train()
        optimizer = make_optimizer(model, config.train)
        state = {"g": torch.Generator().manual_seed(0)}

        def step(same: bool = False):
            if same:
                state["g"] = torch.Generator().manual_seed(0)
            training_step(model, examples, config.train, optimizer, state["g"], contrastive=True,
                          autocast=precision == "bf16")

        for name, fn in (("varying draws", step), ("same draws", lambda: step(True))):
            rows.append({"part": "diagnose", "setting": preset, "model": f"{name} N={draws} B={batch}",
                         "precision": precision, "device": CUDA.type,
                         "ms_per_image": round(timed(fn, CUDA, repeats, 1) * 1000 / batch, 1)})
        unpadded = chunks.UNPADDED_DEVICES
        chunks.UNPADDED_DEVICES = (*unpadded, CUDA.type)  # rows as they come: a new shape for each count
        rows.append({"part": "diagnose", "setting": preset, "model": f"varying draws, rows unpadded N={draws} B={batch}",
                     "precision": precision, "device": CUDA.type,
                     "ms_per_image": round(timed(step, CUDA, repeats, 1) * 1000 / batch, 1)})
        chunks.UNPADDED_DEVICES = unpadded
        torch.backends.cudnn.enabled = False
        rows.append({"part": "diagnose", "setting": preset, "model": f"cudnn off N={draws} B={batch}",
                     "precision": precision, "device": CUDA.type,
                     "ms_per_image": round(timed(step, CUDA, repeats, 1) * 1000 / batch, 1)})
        torch.backends.cudnn.enabled = True
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            sync(CUDA)
        table = prof.key_averages()
        rows.append({"part": "diagnose", "setting": preset, "model": f"profiled step N={draws} B={batch}",
                     "precision": precision, "device": CUDA.type,
                     "host_ms": round(sum(e.self_cpu_time_total for e in table) / 1000, 1),
                     "device_ms": round(sum(getattr(e, "self_device_time_total", 0) for e in table) / 1000, 1)})
        print(f"== {precision}: top operations by self CPU time", flush=True)
        print(table.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=48), flush=True)
        print(f"== {precision}: top operations by device time", flush=True)
        print(table.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=48), flush=True)
    return rows


def gigapixel_rows(slide: Path, work: Path) -> list[dict]:
    from zoomnet.runs import predict_images
    from zoomnet.sources.open import image_size

    h, w = image_size(str(slide))
    rows = []
    devices = [CUDA] + ([torch.device("cpu")] if CUDA.type == "cuda" else [])  # the same machine's CPU
    for device in devices:
        for kind in ("zoomin", "ats"):
            run = untrained_run("camelyon16", work / f"run_{kind}", (f"model.kind={kind}",))
            predict_images(run, [str(slide)], deterministic=True, device=device.type)  # warm-up: CUDA, file cache
            base = reset_peak(device)
            tick = time.perf_counter()
            result = predict_images(run, [str(slide)], deterministic=True, device=device.type)[0]
            sync(device)
            seconds = time.perf_counter() - tick
            rows.append({"part": "gigapixel", "setting": f"camelyon16 slide {w}x{h}", "model": kind,
                         "precision": "fp32", "device": device.type, "ms_per_image": round(seconds * 1000, 1),
                         "peak_cuda_mb": peak_mb(device, base), "decoded_frac": round(result["pixels_read"] / (h * w), 5)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs/experiments/gpu/gpu.csv"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slide-size", type=int, default=25000, help="0: no gigapixel rows")
    parser.add_argument("--work", default="/tmp/zoomnet-gpu")
    parser.add_argument("--device", default="cuda", help="cpu: a quick dry run of the script (no memory figures)")
    parser.add_argument("--quick", action="store_true", help="one setting, one training row (a dry run)")
    parser.add_argument("--diagnose", action="store_true", help="only where a needle-camelyon training step's time goes")
    args = parser.parse_args()
    global CUDA
    CUDA = torch.device(args.device)
    if CUDA.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device; run it on a machine with one")
    if args.diagnose:
        args.slide_size = 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"slide_{args.slide_size}.tif"
    rows: list[dict] = []

    def attempt(fn, *a):
        try:
            out = fn(*a)
        except Exception as exc:  # one failing row must not lose the others
            traceback.print_exc()
            out = {"part": fn.__name__, "setting": str(a[:3]), "status": f"failed: {type(exc).__name__}: {exc}"[:200]}
        for row in out if isinstance(out, list) else [out]:
            print(json.dumps(row), flush=True)
            rows.append(row)

    attempt(diagnose, "needle-camelyon", *((10, 2) if args.quick else (200, 8)), 3)
    for precision in ("fp32", "bf16") if not args.diagnose else ():
        for name in list(SETTINGS)[: 1 if args.quick else None]:
            for kind in ("zoomin", "ats"):
                attempt(inference_row, name, kind, precision, args.repeats)
    steps = [("needle-camelyon", 200, 8), ("needle-camelyon", 200, 1), ("needle-camelyon", 10, 8),
             ("megapixel-mnist", None, 8), ("fmow", None, 1)]
    for preset, draws, batch in steps[: 0 if args.diagnose else 1 if args.quick else None]:
        for precision in ("fp32", "bf16"):
            attempt(train_row, preset, draws, batch, precision, CUDA, max(args.repeats // 2, 3))
        if CUDA.type == "cuda":
            attempt(train_row, preset, draws, batch, "fp32", torch.device("cpu"), 2)
    if args.slide_size and not slide.exists():  # after the timed rows: a busy core slows every CPU-side op
        subprocess.run([sys.executable, "-m", "zoomnet", "make-data", "gigapixel", str(slide), "--size",
                        str(args.slide_size)], stdout=subprocess.DEVNULL, cwd=ROOT, check=False)
    if args.slide_size and slide.exists():
        attempt(gigapixel_rows, slide, work)
    keys = ["part", "setting", "model", "precision", "device", "ms_per_image", "images_per_s", "images_per_s_batch64", "peak_cuda_mb",
            "decoded_frac", "host_ms", "device_ms", "status"]
    name = torch.cuda.get_device_name(0) if CUDA.type == "cuda" else platform.processor() or "cpu"
    write_rows(args.out, [f"{name}, {os.cpu_count()} CPU cores, torch {torch.__version__}, Python "
                          f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}; CPU rows: torch threads "
                          f"{torch.get_num_threads()}"], rows, keys)
    out = args.out
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
