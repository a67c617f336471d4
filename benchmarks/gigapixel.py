"""Gigapixel inference: time, memory and I/O of `zoomnet predict` on pyramidal TIFFs.

For each slide size (synthetic slides from `zoomnet make-data gigapixel`, JPEG tiles of
256 px) and each model (the `camelyon16` preset's 2-level Zoom-In network, and 1-level
ATS at its view scale of 1/8, both with untrained weights: time, memory and I/O do not
depend on the weights), it measures

- `wall_s`: the whole `zoomnet predict RUN SLIDE --deterministic` process, interpreter
  start included;
- `rss_after_load_mb`, `peak_rss_mb`, `peak_above_load_mb`: resident memory of a child
  process after the model is loaded and its peak (VmHWM) after one prediction;
- `bytes_read_frac`: compressed tile bytes read / file size; `decoded_frac`: pixels of the
  decoded tiles / level-0 pixels.

Rows go to a CSV (default docs/experiments/gigapixel/gigapixel.csv) with the machine described in
comment lines; a run that exceeds `--timeout` seconds is reported as such.

    python benchmarks/gigapixel.py --sizes 10000 25000 50000 --data /tmp/zbench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import rss_mb, untrained_run, write_rows  # noqa: E402


def child(run: str, slide: str) -> None:
    """Load the model, note RSS, predict once, print RSS figures and I/O as JSON."""
    import torch

    from zoomnet.runs import load_run, predict_images

    torch.set_num_threads(int(os.environ.get("ZOOMNET_THREADS", "2")))
    load_run(run)
    after_load = rss_mb("VmRSS")
    result = predict_images(run, [slide], deterministic=True)[0]
    from zoomnet.sources.open import image_size

    h, w = image_size(slide)
    print(json.dumps({
        "rss_after_load_mb": after_load,
        "peak_rss_mb": rss_mb("VmHWM"),
        "pixels_read": result["pixels_read"],
        "bytes_read": result["bytes_read"],
        "level0_pixels": h * w,
        "file_bytes": Path(slide).stat().st_size,
        "predict_s": result["seconds"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 25000, 50000])
    parser.add_argument("--models", nargs="+", default=["zoomin", "ats"])
    parser.add_argument("--data", default="/tmp/zbench", help="folder for slides and run folders")
    parser.add_argument("--out", default=str(ROOT / "docs/experiments/gigapixel/gigapixel.csv"))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run counts as too slow")
    parser.add_argument("--child", nargs=2, metavar=("RUN", "SLIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    rows = []
    for size in args.sizes:
        slide = data / f"slide_{size}.tif"
        if not slide.exists():
            subprocess.run([python, "-m", "zoomnet", "make-data", "gigapixel", str(slide), "--size", str(size)], check=True)
        for kind in args.models:
            run = untrained_run("camelyon16", data / f"run_{kind}", (f"model.kind={kind}",))
            row = {"size": size, "model": kind}
            tick = time.perf_counter()
            try:
                subprocess.run([python, "-m", "zoomnet", "predict", str(run), str(slide), "--deterministic",
                                "--device", "cpu"], check=True, capture_output=True, timeout=args.timeout)
                row["wall_s"] = round(time.perf_counter() - tick, 2)
                res = subprocess.run([python, __file__, "--child", str(run), str(slide)], check=True,
                                     capture_output=True, text=True, timeout=args.timeout)
                m = json.loads(res.stdout.strip().splitlines()[-1])
                row.update(
                    rss_after_load_mb=round(m["rss_after_load_mb"], 1),
                    peak_rss_mb=round(m["peak_rss_mb"], 1),
                    peak_above_load_mb=round(m["peak_rss_mb"] - m["rss_after_load_mb"], 1),
                    bytes_read_frac=round(m["bytes_read"] / m["file_bytes"], 5),
                    decoded_frac=round(m["pixels_read"] / m["level0_pixels"], 5),
                    file_mb=round(m["file_bytes"] / 2**20, 1),
                    status="ok",
                )
            except subprocess.TimeoutExpired:
                row.update(wall_s=f">{args.timeout:.0f}", status=f"timed out after {args.timeout:.0f} s")
            except subprocess.CalledProcessError as exc:
                tail = (exc.stderr or b"")
                tail = tail.decode() if isinstance(tail, bytes) else tail
                row.update(status="failed: " + (tail.strip().splitlines() or ["killed"])[-1][:120])
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["size", "model", "wall_s", "rss_after_load_mb", "peak_rss_mb", "peak_above_load_mb",
            "bytes_read_frac", "decoded_frac", "file_mb", "status"]
    write_rows(out, [f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                     f"date: {time.strftime('%Y-%m-%d')}; torch threads: {os.environ.get('ZOOMNET_THREADS', '2')}"],
               rows, keys)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
