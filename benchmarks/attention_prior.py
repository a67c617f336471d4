"""How often an untrained model's sampled sub-tiles hit an object, by the initial gain of
the attention nets' contrast prior (docs/design.md, "Starting by itself").

For each synthetic set (written with `make-data` into a temporary folder) and its preset,
the share of sub-tiles drawn with the preset's training draws that overlap an object of the
mask, over the first training images, with the same initial weights for every gain. Writes
`docs/experiments/attention-prior/attention_prior.csv`.

    python benchmarks/attention_prior.py            # gains 0, 3, 5; 24 images a set
"""

from __future__ import annotations

import argparse
import csv
import platform
import tempfile
from pathlib import Path

import torch

from zoomnet.config import load_config
from zoomnet.data.manifest import class_list, load_examples, read_manifest
from zoomnet.data.generators import write_dataset
from zoomnet.model import build_model
from zoomnet.metrics import object_hits

ROOT = Path(__file__).resolve().parents[1]
SETS = {"megapixel-mnist": "megapixel-mnist", "tiny-objects": "tiny-objects", "needles": "needle-camelyon"}


def hit_rate(preset: str, csv_path: Path, gain: float, images: int) -> tuple[float, float]:
    """``(share of sampled sub-tiles on an object, share of images with one)``."""
    classes = class_list(read_manifest(csv_path))
    examples = [e for e in load_examples(csv_path, classes) if e.has_objects()][:images]
    config = load_config(preset, [f"model.attention_prior={gain}"])
    torch.manual_seed(0)
    model = build_model(config.model).train()
    generator = torch.Generator().manual_seed(0)
    totals = [0, 0, 0, 0]
    with torch.no_grad():
        for i in range(0, len(examples), 4):
            batch = examples[i : i + 4]
            out = model([e.source for e in batch], generator=generator)
            totals = [a + b for a, b in zip(totals, object_hits(out, batch))]
    return totals[0] / max(totals[1], 1), totals[2] / max(totals[3], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gains", type=float, nargs="*", default=[0.0, 3.0, 5.0])
    parser.add_argument("--images", type=int, default=24, help="images with objects per set")
    parser.add_argument("--out", default=str(ROOT / "docs/experiments/attention-prior/attention_prior.csv"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, preset in SETS.items():
            folder = write_dataset(kind, Path(tmp) / kind, num=4 * args.images)
            for gain in args.gains:
                subtiles, images = hit_rate(preset, folder / "train.csv", gain, args.images)
                rows.append({"set": kind, "preset": preset, "gain": gain, "subtiles_on_objects": round(subtiles, 5),
                             "images_hit": round(images, 4)})
                print(f"{kind:16s} gain {gain:4.1f}: sub-tiles on objects {subtiles:7.2%}, images hit {images:.2f}")
    with open(args.out, "w", newline="") as fh:
        fh.write(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, untrained, seed 0\n")
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
