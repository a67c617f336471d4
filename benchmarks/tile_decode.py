"""Decoding a read's TIFF tiles in a thread pool against one at a time, in one run.

``TiffSource`` decodes the tiles of one read together in a shared thread pool
(``tile_workers``, default 4; the JPEG and zlib codecs release the GIL). On JPEG-tiled
slides from ``zoomnet make-data camelyon16`` / ``gigapixel``, with ``tile_workers`` 1 and 4
alternated: (a) reads of random 1024x1024 level-0 boxes (16-25 tiles each, cache cleared),
in boxes/s; (b) one training epoch of the ``camelyon16`` preset over the slides of a
manifest, in images/s. Rows go to ``docs/experiments/reading-ahead/tile_decode.csv``.

    python benchmarks/tile_decode.py c16/train.csv --slides 6 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _results import write_rows
from zoomnet.config import load_config
from zoomnet.core.geometry import Box
from zoomnet.data.manifest import class_list, load_examples, read_manifest
from zoomnet.model import build_model
from zoomnet.sources.tiff import TiffSource
from zoomnet.train import make_optimizer, train_epoch

ROOT = Path(__file__).resolve().parents[1]


def reads_per_s(examples, workers: int, boxes: int = 24) -> float:
    rng = np.random.default_rng(0)
    tick, n = time.perf_counter(), 0
    for ex in examples:
        src = ex.source.opened()
        src.tile_workers, src._cache = workers, type(src._cache)()
        for _ in range(boxes):
            y, x = int(rng.integers(0, src.height - 1024)), int(rng.integers(0, src.width - 1024))
            src.read(Box(y, x, 1024, 1024))
            n += 1
    return n / (time.perf_counter() - tick)


def epoch_images_per_s(examples, config, workers: int) -> float:
    for ex in examples:
        src = ex.source.opened()
        src.tile_workers, src._cache = workers, type(src._cache)()
    torch.manual_seed(0)
    model = build_model(config.model)
    stats = train_epoch(model, examples, config.train, make_optimizer(model, config.train), 1,
                        torch.Generator().manual_seed(0), progress=False)
    return stats["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=str(ROOT / "docs/experiments/reading-ahead/tile_decode.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config("camelyon16")
    classes = class_list(read_manifest(args.manifest))
    config.data.classes = classes
    config.train.reference_class = 0
    examples = load_examples(args.manifest, classes, config.data.fill, "training")[: args.slides]
    if not all(isinstance(ex.source.opened(), TiffSource) for ex in examples):
        raise SystemExit(f"{args.manifest}: give a manifest of TIFF slides")
    found: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for workers in (1, 4):
            for name, fn in (("level-0 reads of 1024^2 (boxes/s)", lambda w: reads_per_s(examples, w)),
                             ("camelyon16 training epoch (images/s)", lambda w: epoch_images_per_s(examples, config, w))):
                value = fn(workers)
                found.setdefault((name, workers), []).append(value)
                print(f"{name}, tile_workers {workers}: {value:.3f}", flush=True)
    rows = [{"measure": name, "tile_workers": w, "value": round(statistics.median(v), 3)} for (name, w), v in found.items()]
    write_rows(args.out, [f"{args.manifest}, {len(examples)} slides; {platform.processor() or platform.machine()}, "
                          f"torch {torch.__version__}, {args.threads} torch threads"], rows)


if __name__ == "__main__":
    main()
