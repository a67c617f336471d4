"""Slides at Camelyon16's sizes: two levels (`camelyon16`) against three (`camelyon16-k3`).

For each slide size (``make-data slides``' writer: tissue on glass, 512 px JPEG tiles, a 4x
pyramid), each preset with untrained weights (time, memory and I/O do not depend on them):

- ``predict_s``: a whole ``zoomnet predict RUN SLIDE --deterministic`` process;
- ``in_process_s``: one prediction inside a process that has loaded the run (the median of
  three processes): ``predict_s`` less Python's and torch's start;
- ``peak_above_load_mb``: the peak resident memory (VmHWM) of a child process above its
  resident memory after the model loaded, one prediction (the median of three processes,
  and their range: glibc's arenas make it vary by tens of MB from run to run);
- ``bytes_read_frac``, ``decoded_frac``: compressed bytes read / file size, decoded pixels /
  level-0 pixels;
- ``gflops``: one prediction's FLOPs (``zoomnet.bench.flop_counter``);
- ``train_step_s``, ``train_peak_above_load_mb``: one training step (batch 1, the preset's
  draws, the contrastive term on), after a warm-up step, in another child process.

Rows go to ``docs/experiments/slide-scale/slide_scale.csv``, and a plot beside it.

    python benchmarks/slide_scale.py --data /tmp/zslides
    python benchmarks/slide_scale.py --sizes 10000x10000 25000x25000 --presets camelyon16
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import rss_mb, untrained_run, write_rows  # noqa: E402

SIZES = ["10000x10000", "25000x25000", "50000x50000", "100000x100000", "100000x200000"]  # height x width
PRESETS = ["camelyon16", "camelyon16-k3"]
REPEATS = 3  # prediction processes per slide and preset: the median's peak memory and time


def child_predict(run: str, slide: str) -> dict:
    import torch

    from zoomnet.bench import flop_counter
    from zoomnet.runs import load_run, open_run_image, predict_images

    model, config = load_run(run)
    after_load = rss_mb("VmRSS")
    tick = time.perf_counter()
    result = predict_images(run, [slide], deterministic=True)[0]
    seconds, peak = time.perf_counter() - tick, rss_mb("VmHWM")
    src = open_run_image(slide, config)
    with flop_counter() as fc, torch.inference_mode():
        model.predict([src], deterministic=True)
    return {"rss_after_load_mb": after_load, "peak_rss_mb": peak, "seconds": seconds, "pixels_read": result["pixels_read"],
            "bytes_read": result["bytes_read"], "level0_pixels": src.height * src.width,
            "file_bytes": Path(slide).stat().st_size, "gflops": fc.get_total_flops() / 1e9}


def child_train(run: str, slide: str) -> dict:
    import torch

    from zoomnet.data.examples import Example
    from zoomnet.runs import load_run, open_run_image
    from zoomnet.train import make_optimizer, training_step

    model, config = load_run(run)
    model.train()
    optimizer = make_optimizer(model, config.train)
    config.train.reference_class = 0
    batch = [Example(open_run_image(slide, config), 1, None, slide)]
    generator = torch.Generator().manual_seed(0)
    training_step(model, batch, config.train, optimizer, generator, contrastive=True)  # warm-up
    after_warmup = rss_mb("VmRSS")
    tick = time.perf_counter()
    training_step(model, batch, config.train, optimizer, generator, contrastive=True)
    return {"train_step_s": time.perf_counter() - tick, "after_warmup_mb": after_warmup, "peak_rss_mb": rss_mb("VmHWM")}


def _child(kind: str, run: str, slide: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, run, slide], check=True, capture_output=True,
                          text=True, timeout=3600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(preset: str, run: Path, slide: Path) -> dict:
    row = {"preset": preset}
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zoomnet", "predict", str(run), str(slide), "--deterministic", "--device",
                    "cpu", "--quiet"], check=True, capture_output=True, timeout=3600)
    row["predict_s"] = round(time.perf_counter() - tick, 2)
    runs = [_child("predict", str(run), str(slide)) for _ in range(REPEATS)]  # glibc's arenas vary run to run
    p = sorted(runs, key=lambda r: r["peak_rss_mb"] - r["rss_after_load_mb"])[REPEATS // 2]
    above = sorted(r["peak_rss_mb"] - r["rss_after_load_mb"] for r in runs)
    row.update(in_process_s=round(statistics.median(r["seconds"] for r in runs), 2),
               peak_above_load_mb=round(above[REPEATS // 2], 1), peak_above_load_range_mb=f"{above[0]:.0f}-{above[-1]:.0f}",
               peak_rss_mb=round(p["peak_rss_mb"], 1), bytes_read_frac=round(p["bytes_read"] / p["file_bytes"], 5),
               decoded_frac=round(p["pixels_read"] / p["level0_pixels"], 5), gflops=round(p["gflops"], 2),
               file_mb=round(p["file_bytes"] / 2**20, 1))
    t = _child("train", str(run), str(slide))
    row.update(train_step_s=round(t["train_step_s"], 2), train_peak_rss_mb=round(t["peak_rss_mb"], 1))
    return row


def plot(rows: list[dict], path: Path) -> None:
    from _results import line_panels

    panels = []
    for key, title in (("predict_s", "predict, whole process (s)"), ("peak_rss_mb", "peak RSS (MB)"),
                       ("decoded_frac", "pixels decoded / level-0 pixels"), ("train_step_s", "training step (s)")):
        panels.append((title, {p: [(r["gigapixels"], r[key]) for r in rows if r["preset"] == p]
                               for p in sorted({r["preset"] for r in rows})}))
    line_panels(path, panels, "slide (gigapixels, log)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="HEIGHTxWIDTH of each slide")
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--data", default="/tmp/zslides", help="folder for the slides and run folders")
    parser.add_argument("--out", default=str(ROOT / "docs/experiments/slide-scale/slide_scale.csv"))
    parser.add_argument("--child", nargs=3, metavar=("KIND", "RUN", "SLIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, run, slide = args.child
        print(json.dumps(child_predict(run, slide) if kind == "predict" else child_train(run, slide)))
        return
    from zoomnet.data.generators.scanner import write_slide

    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        height, width = (int(v) for v in size.split("x"))
        slide = data / f"slide_{height}x{width}.tif"
        if not slide.exists():
            tick = time.perf_counter()
            write_slide(slide, height, width, seed=1, lesions=2, progress=False)
            print(f"# wrote {slide} in {time.perf_counter() - tick:.0f} s", flush=True)
        for preset in args.presets:
            row = {"height": height, "width": width, "gigapixels": round(height * width / 1e9, 3),
                   **measure(preset, untrained_run(preset, data / f"run_{preset}", classes=("normal", "tumor")), slide)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    write_rows(out, [f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
                     f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}; untrained weights"], rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
