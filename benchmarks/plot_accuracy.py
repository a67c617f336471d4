"""Accuracy against peak inference memory, one point per model, from `zoomnet bench` CSVs.

    python benchmarks/plot_accuracy.py docs/experiments/needles/needles.csv docs/experiments/megapixel-mnist/megapixel-mnist.csv

Writes `docs/experiments/needles/accuracy_vs_memory.png` (one panel per CSV; Pillow only). Models
without an accuracy (the full-resolution CNN, cost only) are left out.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"zoomin": (200, 60, 20), "ats": (30, 90, 200), "ats-fullres": (110, 150, 230),
           "cnn-downsampled": (60, 140, 60), "cnn": (120, 120, 120)}


def read(path: Path) -> tuple[str, list[dict]]:
    lines = path.read_text().splitlines()
    title = next((ln[2:].split(";")[0] for ln in lines if ln.startswith("# setting:")), path.stem)
    rows = [r for r in csv.DictReader(ln for ln in lines if not ln.startswith("#")) if r["accuracy"]]
    return title.replace("setting: ", ""), rows


def panel(title: str, rows: list[dict], w: int = 420, h: int = 340, m: int = 56) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [math.log10(float(r["peak_memory_mb"])) for r in rows]
    x0, x1 = math.floor(min(xs) - 0.1), math.ceil(max(xs) + 0.1)
    accs = [float(r["accuracy"]) for r in rows]
    y0, y1 = max(0.0, math.floor(min(accs) * 10 - 0.5) / 10), 1.0

    def px(x: float, y: float) -> tuple[float, float]:
        return (m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / max(y1 - y0, 1e-9) * (h - 2 * m))

    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    for e in range(x0, x1 + 1):
        x, _ = px(e, y0)
        d.text((x - 12, h - m + 6), f"{10 ** e:g} MB", fill="black")
    for i in range(int(round((y1 - y0) * 10)) + 1):
        y = y0 + i / 10
        _, yy = px(x0, y)
        d.text((12, yy - 6), f"{y:.1f}", fill="black")
    for r in rows:
        x, y = px(math.log10(float(r["peak_memory_mb"])), float(r["accuracy"]))
        colour = COLOURS.get(r["model"], (0, 0, 0))
        std = float(r["accuracy_std"]) if r.get("accuracy_std") else 0.0
        if std:  # the seeds' spread
            _, ya = px(x0, min(y1, float(r["accuracy"]) + std))
            _, yb = px(x0, max(y0, float(r["accuracy"]) - std))
            d.line([(x, ya), (x, yb)], fill=colour, width=2)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
        d.text((x + 7, y - 14), r["model"], fill=colour)
    d.text((m, 14), title, fill="black")
    d.text((m, 30), "test accuracy vs peak inference memory (log)", fill="black")
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csvs", nargs="+", type=Path)
    parser.add_argument("--out", default=str(ROOT / "docs" / "experiments" / "needles" / "accuracy_vs_memory.png"))
    args = parser.parse_args()
    panels = [panel(*read(p)) for p in args.csvs]
    out = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width
    out.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
