"""A cohort of slides at Camelyon16's sizes, trained through the CLI with the three-level preset.

The cohort is ``zoomnet make-data slides`` (30 slides, 30-100 % of 200,000 px wide, tissue on
15-40 % of the glass, every other slide ``tumor`` with lesions of 0.05-0.5 % of the tissue,
a third of those with one micro-lesion of 0.01-0.03 %; 18 training, 6 validation, 6 test).
Each run is ``zoomnet train --config camelyon16-k3`` (``plain``), the same with the lesion
masks at 1/16 (``masks``: ``train.mask_weight=1``), or with 400 training draws and 10 %
uniform mass in every map (``draws``), then ``zoomnet evaluate`` on the
test slides. Runs that finished are reused; the trainings run one thread each, two at a
time.

Rows (one per run, then the mean per kind): test accuracy, AUC, the share of sampled
sub-tiles on a lesion at test time (masks are read for that measure in both kinds), the
best validation epoch, the epochs' mean seconds, pixels decoded and compressed bytes read
per epoch and the decoded share of the level-0 pixels trained on, the training's wall time.
Writes ``docs/experiments/slide-cohort/slide_cohort.csv``, its per-epoch companion
``slide_cohort_epochs.csv`` and a plot.

    python benchmarks/slide_cohort.py --work bench-runs/cohort --seeds 0 1 2 --kinds plain masks
    python benchmarks/slide_cohort.py --work /tmp/small --num 6 --size 4000 --epochs 1 --seeds 0 --out /tmp/small.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _results import line_panels, write_rows

ROOT = Path(__file__).resolve().parents[1]
EXTRA = {"plain": [], "masks": ["--set", "train.mask_weight=1"],
         # four times the preset's training draws, and 10 % uniform mass in every map (exploration)
         "draws": ["--set", "model.train_samples=400", "model.smooth=0.1"]}


def zoomnet(*args: str, log: Path | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "zoomnet", *args], env=env, capture_output=True, text=True)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"zoomnet {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def train_and_evaluate(work: Path, kind: str, seed: int, epochs: int) -> Path:
    """The run folder of ``kind`` and ``seed``, trained and evaluated unless it was already."""
    run = work / "runs" / f"{kind}-seed{seed}"
    if not (run / "done").exists():
        resume = ["--resume"] if (run / "last.safetensors").exists() else []
        tick = time.time()
        zoomnet("train", "--config", "camelyon16-k3", "--train", str(work / "data/train.csv"), "--val",
                str(work / "data/val.csv"), "--out", str(run), "--epochs", str(epochs), "--seed", str(seed),
                "--device", "cpu", "--quiet", "--force", *resume, *EXTRA[kind], log=run.with_suffix(".train.log"))
        (run / "wall.json").write_text(json.dumps({"train_s": round(time.time() - tick)}))
        zoomnet("evaluate", str(run), str(work / "data/test.csv"), "--seed", str(seed), "--quiet",
                log=run.with_suffix(".eval.log"))
        (run / "done").touch()
    return run


def summary(run: Path, kind: str, seed: int) -> tuple[dict, list[dict]]:
    epochs = list(csv.DictReader(open(run / "metrics.csv")))
    test = json.loads(run.with_suffix(".eval.log").read_text().strip().splitlines()[-1])
    best = max(epochs, key=lambda r: (float(r["val_accuracy"] or 0), -float(r["val_loss"] or 0)))
    mean = lambda key: statistics.mean(float(r[key]) for r in epochs if r.get(key))
    wall = json.loads((run / "wall.json").read_text())["train_s"] if (run / "wall.json").exists() else ""
    number = lambda key: round(float("nan") if test.get(key) is None else test[key], 4)  # null: nothing to measure
    row = {"kind": kind, "seed": seed, "accuracy": number("accuracy"), "auc": number("auc"),
           "test_hit_rate": number("hit_rate"), "best_epoch": int(best["epoch"]),
           "epochs": len(epochs), "epoch_s": round(mean("seconds"), 1), "gpixels_decoded_per_epoch": round(mean("pixels_decoded") / 1e9, 3),
           "mb_read_per_epoch": round(mean("bytes_read") / 2**20, 1), "decoded_share": round(mean("decoded_share"), 5),
           "train_s": wall}
    per_epoch = [{"kind": kind, "seed": seed, **{k: r[k] for k in ("epoch", "train_accuracy", "val_accuracy", "val_auc",
                                                                   "train_hit_rate", "seconds", "pixels_decoded", "bytes_read")}}
                 for r in epochs]
    return row, per_epoch


def mean_rows(rows: list[dict]) -> list[dict]:
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        avg = {"kind": kind, "seed": "mean"}
        for key in ("accuracy", "auc", "test_hit_rate", "epoch_s", "gpixels_decoded_per_epoch", "mb_read_per_epoch",
                    "decoded_share"):
            avg[key] = round(statistics.mean(r[key] for r in mine), 4)
        avg["accuracy_std"] = round(statistics.pstdev(r["accuracy"] for r in mine), 4)
        out.append(avg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench-runs/cohort", help="folder of the cohort (data/) and its runs (runs/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=["plain", "masks"], choices=sorted(EXTRA))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--num", type=int, default=30, help="slides of the cohort, when it is written")
    parser.add_argument("--size", type=int, default=200_000, help="the widest slide's width, when it is written")
    parser.add_argument("--parallel", type=int, default=2, help="trainings at a time")
    parser.add_argument("--out", default=str(ROOT / "docs/experiments/slide-cohort/slide_cohort.csv"))
    args = parser.parse_args()
    work = Path(args.work)
    if not (work / "data/test.csv").exists():
        zoomnet("make-data", "slides", str(work / "data"), "--num", str(args.num), "--size", str(args.size), "--seed", "0")
    jobs = [(kind, seed) for seed in args.seeds for kind in args.kinds]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: train_and_evaluate(work, *job, args.epochs), jobs))
    rows, epochs = [], []
    for run, (kind, seed) in zip(runs, jobs):
        row, per_epoch = summary(run, kind, seed)
        print(json.dumps(row), flush=True)
        rows.append(row)
        epochs += per_epoch
    out = Path(args.out)
    note = [f"machine: {platform.platform()}, {os.cpu_count()} CPUs; trainings one thread each, {args.parallel} at a time"]
    write_rows(out, note, rows + mean_rows(rows), keys=[*rows[0], "accuracy_std"])
    write_rows(out.with_name(out.stem + "_epochs.csv"), note, epochs)
    panels = [(title, {f"{r['kind']} seed {r['seed']}": [(int(e["epoch"]), float(e[key])) for e in epochs
                                                         if (e["kind"], e["seed"]) == (r["kind"], r["seed"]) and e[key]]
                       for r in rows})
              for key, title in (("val_accuracy", "validation accuracy"), ("train_hit_rate", "training sub-tiles on a lesion"))]
    line_panels(out.with_suffix(".png"), panels, "epoch", log_x=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
