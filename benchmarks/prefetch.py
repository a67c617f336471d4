"""Training images/s with and without reading the next batch's level-1 views ahead.

``train_epoch`` reads the next batch's level-1 views (file decoding and resampling) in a
thread while the current batch trains. This trains one epoch over the first ``--images``
rows of a manifest with a preset, alternately without and with the read-ahead
(``--rounds`` times each, the same weights and draws every time), and prints images/s;
rows go to ``docs/experiments/reading-ahead/prefetch.csv``.

    python benchmarks/prefetch.py m2k/train.csv --preset megapixel-mnist --images 32 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch

from _results import write_rows
from zoomnet.config import load_config
from zoomnet.data.manifest import class_list, load_examples, read_manifest
from zoomnet.model import build_model
from zoomnet.train import make_optimizer, train_epoch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("--preset", default="megapixel-mnist")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs/experiments/reading-ahead/prefetch.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.preset)
    classes = class_list(read_manifest(args.manifest))
    config.model.num_classes = len(classes)
    config.train.reference_class = None if len(classes) > 2 else 0
    examples = load_examples(args.manifest, classes, config.data.fill, "training")[: args.images]
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for prefetch in (False, True):
            torch.manual_seed(0)
            model = build_model(config.model)
            stats = train_epoch(model, examples, config.train, make_optimizer(model, config.train), 1,
                                torch.Generator().manual_seed(0), progress=False, prefetch=prefetch)
            rates[prefetch].append(stats["images_per_s"])
            print(f"prefetch {prefetch}: {stats['images_per_s']:.3f} images/s", flush=True)
    rows = [{"preset": args.preset, "images": len(examples), "prefetch": p, "images_per_s": round(statistics.median(r), 3)}
            for p, r in rates.items()]
    rows.append({"preset": args.preset, "images": len(examples), "prefetch": "ratio",
                 "images_per_s": round(statistics.median(rates[True]) / statistics.median(rates[False]), 3)})
    write_rows(args.out, [f"{args.manifest}; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{args.threads} torch threads"], rows)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
