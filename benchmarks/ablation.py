"""Ablation over N, the entropy weight lambda and the contrastive term (the paper's
supplementary study), on the `needles` benchmark setting.

Each variant trains Zoom-In with `zoomnet bench needles --models zoomin --set ...` (the
same synthetic set, epochs and seeds as the main table; runs are reused when present) and
reports test accuracy, the share of positive test images where a sampled sub-tile overlaps
a lesion, and Spearman's rho between sampled sub-tiles' attention and their lesion
coverage. Writes `docs/experiments/ablation/ablation.csv`.

    python benchmarks/ablation.py --seeds 1
    python benchmarks/ablation.py --seeds 1 --variants "N=10" "no contrastive"
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
from pathlib import Path

import torch

from zoomnet.bench import run_bench

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides; the default is the `needles` setting (N = 30 at inference, 200 draws in
# training, lambda = 1e-5, contrastive term from epoch 4 of 6)
VARIANTS = {
    "default": [],
    "N=10": ["model.samples=10", "model.train_samples=67"],
    "N=60": ["model.samples=60", "model.train_samples=400"],
    "lambda=0": ["train.entropy_weight=0"],
    "lambda=1e-3": ["train.entropy_weight=1e-3"],
    "no contrastive": ["train.contrastive_from=null"],
}
FIELDS = ["variant", "overrides", "seeds", "accuracy", "accuracy_std", "images_hit", "spearman", "peak_memory_mb",
          "ms_per_image"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", default="bench-runs")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "ablation.csv"))
    args = parser.parse_args()

    rows = []
    for name in args.variants:
        with contextlib.redirect_stdout(io.StringIO()):  # keep stdout to the table below
            (row,) = run_bench("needles", models=["zoomin"], skip_training=False, seeds=args.seeds, work=args.work,
                               overrides=VARIANTS[name], progress=False)
        rows.append({"variant": name, "overrides": " ".join(VARIANTS[name]), "seeds": args.seeds,
                     **{k: row.get(k, "") for k in FIELDS[3:]}})
        print(",".join(str(rows[-1][k]) for k in FIELDS), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        fh.write(f"# needles ablation, Zoom-In; {platform.platform()}, {os.cpu_count()} CPUs, torch "
                 f"{torch.__version__}, {torch.get_num_threads()} threads\n")
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
