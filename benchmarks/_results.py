"""Writing a benchmark's rows: comment lines saying what ran where, then a CSV."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def rss_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak) of this process, in MB (NaN off Linux)."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def untrained_run(preset: str, out: Path, overrides: tuple[str, ...] = (),
                  classes: tuple[str, str] = ("negative", "positive")) -> Path:
    """A run folder of ``preset`` (with ``overrides``) holding untrained weights (seed 0):
    what time, memory and I/O benchmarks predict with."""
    import json

    import torch

    from zoomnet.checkpoint import atomic_write_bytes, save_checkpoint
    from zoomnet.config import load_config
    from zoomnet.model import build_model

    config = load_config(preset, list(overrides))
    config.data.classes = list(classes)
    config.data.reference_class = classes[0]
    torch.manual_seed(0)
    model = build_model(config.model)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.json", json.dumps(config.to_dict(), indent=2).encode())
    save_checkpoint(model, out / "best.safetensors", {"epoch": 0, "classes": config.data.classes})
    return out


def write_rows(path: str | Path, comments: list[str], rows: list[dict], keys: list[str] | None = None) -> None:
    """``# comment`` lines, then ``rows`` under the header ``keys`` (default: the first row's);
    a row without a key leaves its cell empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = keys or list(rows[0])
    with open(path, "w", newline="") as fh:
        for line in comments:
            fh.write(f"# {line}\n")
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})


def alternated_arguments(doc: str, csv_path: str | Path, extra=None) -> argparse.Namespace:
    """The arguments of a benchmark that alternates two forms round by round: ``--rounds``,
    ``--threads`` (set for torch here) and ``--csv`` (default ``csv_path``); ``extra(parser)``
    adds a benchmark's own."""
    import torch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", default=str(csv_path))
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


COLOURS = [(200, 60, 20), (30, 90, 200), (60, 140, 60), (120, 120, 120), (150, 60, 170)]


def line_panels(path: str | Path, panels: list[tuple[str, dict[str, list[tuple[float, float]]]]],
                xlabel: str, log_x: bool = True, w: int = 380, h: int = 300, m: int = 56) -> None:
    """A row of line plots (Pillow only): each panel a title and ``{series: [(x, y), ...]}``."""
    import math

    from PIL import Image, ImageDraw

    out = Image.new("RGB", (w * len(panels), h), "white")
    for k, (title, series) in enumerate(panels):
        img = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(img)
        pts = [p for s in series.values() for p in s]
        tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
        x0, x1 = min(tx(p[0]) for p in pts), max(tx(p[0]) for p in pts)
        y0, y1 = 0.0, max(p[1] for p in pts) * 1.1 or 1.0
        x1 = x1 if x1 > x0 else x0 + 1

        def px(x: float, y: float) -> tuple[float, float]:
            return (m + (tx(x) - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m))

        d.line([(m, h - m), (w - m, h - m)], fill="black")
        d.line([(m, m), (m, h - m)], fill="black")
        for i in range(5):
            y = y0 + (y1 - y0) * i / 4
            d.text((4, px(10 ** x0 if log_x else x0, y)[1] - 6), f"{y:.3g}", fill="black")
        for x, _ in sorted({(p[0], 0) for p in pts}):
            d.text((px(x, 0)[0] - 10, h - m + 6), f"{x:g}", fill="black")
        for i, (name, s) in enumerate(series.items()):
            colour = COLOURS[i % len(COLOURS)]
            xy = [px(x, y) for x, y in sorted(s)]
            if len(xy) > 1:
                d.line(xy, fill=colour, width=2)
            for x, y in xy:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            d.text((m + 8, m + 14 * i), name, fill=colour)
        d.text((m, 12), title, fill="black")
        d.text((w // 2 - 40, h - 20), xlabel, fill="black")
        out.paste(img, (k * w, 0))
    out.save(path)
