"""Inference draws chosen per image (``predict --samples auto``) against the run's fixed N,
on each preset's stand-in, with the trained runs of ``zoomnet bench``.

For every run folder given (``RUNS/<setting>/zoomin-seed<s>``, its test set in
``RUNS/<setting>/data/test.csv``), each test image is predicted three ways with the same
seed: one draw set of the run's N (what ``predict`` does by default), and draw sets of N/4
and of N/8 draws until the decision is settled at 95 % or 8 sets are drawn
(``zoomnet.uncertainty.predict_until_settled``; ``--samples auto`` uses N/4). Rows per run
and way: accuracy, mean draws per image, their 90th percentile and maximum, and
milliseconds per image. Writes ``docs/experiments/draws/auto_inference.csv`` (``--csv``).

    python benchmarks/auto_samples.py /work/bench-runs/runs --settings colon-cancer needles
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
from zoomnet.data.manifest import load_examples
from zoomnet.runs.loading import load_run
from zoomnet.uncertainty import draw_set_statistics, predict_until_settled

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("colon-cancer", "needles", "needles-hard", "tiny-objects", "traffic-signs", "fmow", "camelyon16",
            "megapixel-mnist")
WAYS = {"fixed N": None, "auto, sets of N/4": 4, "auto, sets of N/8": 8}


def one_run(run: Path, test_csv: Path, seed: int) -> list[dict]:
    """The rows of one run folder: each way's accuracy, draws and time over its test set."""
    model, config = load_run(run, "cpu")
    examples = load_examples(test_csv, config.data.classes, config.data.fill, "test")
    n = config.model.samples
    rows = []
    for way, part in WAYS.items():
        generator = torch.Generator().manual_seed(seed)
        correct, draws, seconds = [], [], []
        for example in examples:
            tick = time.perf_counter()
            if part is None:
                logits = model.predict([example.source], generator=generator).logits
                used = n
            else:
                each = max(1, -(-n // part))
                logits, _ = predict_until_settled(model, example.source, None, each, generator)
                used = logits.shape[0] * each
                logits = draw_set_statistics(logits).probabilities[None]
            seconds.append(time.perf_counter() - tick)
            correct.append(int(logits.argmax()) == example.label)
            draws.append(used)
        rows.append({"setting": run.parent.name, "run": run.name, "way": way, "n": n, "images": len(examples),
                     "accuracy": round(float(np.mean(correct)), 4), "mean_draws": round(float(np.mean(draws)), 1),
                     "p90_draws": int(np.percentile(draws, 90)), "max_draws": max(draws),
                     "ms_per_image": round(1000 * statistics.mean(seconds), 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="the folder of zoomnet bench's runs (one folder per setting)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", default=str(ROOT / "docs/experiments/draws/auto_inference.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for setting in args.settings:
        for seed in args.seeds:
            run = Path(args.runs) / setting / f"zoomin-seed{seed}"
            if (run / "done").exists():
                rows += one_run(run, Path(args.runs) / setting / "data" / "test.csv", seed)
    comments = [f"{platform.machine()} CPU, {args.threads} torch threads, torch {torch.__version__}; the runs of "
                "zoomnet bench (zoomin, seeds 0-2), each test image predicted with one seed per run: one draw set "
                "of N, and sets of N/4 or N/8 until the decision is settled at 95 % (at most 8 sets)"]
    write_rows(args.csv, comments, rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
