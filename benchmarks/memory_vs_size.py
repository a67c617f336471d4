"""Peak inference memory against image size: Zoom-In against ATS, same settings.

The `needle-camelyon` settings (Zoom-In: 128 px tiles at 1/4, 32 px sub-tiles on the dense
grid of 1/2, N = 30; ATS at 1/2 with the same patches, N and feature net) on square images
of 1k^2 to 16k^2 (`--sizes`), untrained weights, the image held lazily (numpy, read by
crops). Peak memory is `zoomnet.bench.PeakTensorMemory` (live tensors, weights excluded).
Writes `docs/experiments/memory-vs-size/memory_vs_size.csv` and a plot `memory_vs_size.png` beside it.

    python benchmarks/memory_vs_size.py --sizes 1024 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from zoomnet.bench import PeakTensorMemory, setting_config
from zoomnet.sources.held import NumpySource
from zoomnet.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def texture(size: int, seed: int = 0) -> np.ndarray:
    """A cheap textured image of any size (memory is what is measured, not accuracy)."""
    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    reps = -(-size // 256)
    return np.tile(tile, (reps, reps, 1))[:size, :size]


def peak_mb(kind: str, image: np.ndarray) -> tuple[float, float]:
    config = setting_config("needles", kind)
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    with PeakTensorMemory() as mem:
        tick = time.perf_counter()
        model.predict([NumpySource(image)], generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - tick
    return mem.peak / 2**20, seconds


def plot(rows: list[dict], path: Path) -> None:
    """Log-log plot of peak memory against image side, one line per model (Pillow only)."""
    w, h, m = 640, 420, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [np.log2(r["size"]) for r in rows]
    ys = [np.log10(max(r[k], 1e-3)) for r in rows for k in ("zoomin_mb", "ats_mb")]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys) - 0.2, max(ys) + 0.2

    def px(x, y):
        return m + (x - x0) / max(x1 - x0, 1e-9) * (w - 2 * m), h - m - (y - y0) / max(y1 - y0, 1e-9) * (h - 2 * m)

    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    for r in rows:
        x, _ = px(np.log2(r["size"]), y0)
        d.text((x - 14, h - m + 6), f"{r['size'] // 1024}k", fill="black")
    for e in range(int(np.floor(y0)), int(np.ceil(y1)) + 1):
        _, y = px(x0, e)
        if m <= y <= h - m:
            d.text((8, y - 6), f"{10 ** e:g} MB", fill="black")
    for key, colour in (("zoomin_mb", (200, 60, 20)), ("ats_mb", (30, 90, 200))):
        pts = [px(np.log2(r["size"]), np.log10(max(r[key], 1e-3))) for r in rows]
        d.line(pts, fill=colour, width=3)
        for p in pts:
            d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=colour)
        d.text((pts[-1][0] - 60, pts[-1][1] - 18), "Zoom-In" if key == "zoomin_mb" else "ATS", fill=colour)
    d.text((m, 20), "peak inference memory (live tensors) vs image side, needle-camelyon settings", fill="black")
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--out", default=str(ROOT / "docs/experiments/memory-vs-size/memory_vs_size.csv"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for size in args.sizes:
        image = texture(size)
        z, zs = peak_mb("zoomin", image)
        a, as_ = peak_mb("ats", image)
        row = {"size": size, "zoomin_mb": round(z, 2), "ats_mb": round(a, 2), "ratio": round(a / z, 2),
               "zoomin_s": round(zs, 2), "ats_s": round(as_, 2)}
        print(row, flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        fh.write(f"# machine: {platform.platform()}, {os.cpu_count()} CPUs; torch {torch.__version__}, 2 threads\n")
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
