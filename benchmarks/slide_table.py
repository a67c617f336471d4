"""The paper's Table 2 in shape on the slide stand-in: accuracy against the share of level-0
pixels each model reads, and its time per slide.

For each trained run of ``RUNS/camelyon16/<kind>-seed<s>`` (``zoomin``: the preset;
``masks``: the preset with ``train.mask_weight=1``; ``ats``; ``mil``: the attention-MIL
baseline that embeds every tissue tile, ``model.kind=mil``), the test slides are predicted
through ``predict_images`` (each run's own N, seed = the run's seed): test accuracy, AUC,
the pixels decoded per slide over its level-0 pixels (whole JPEG tiles, at whichever
pyramid level each read is taken from; the slides opened afresh for each run), and the
seconds per slide. One row per run, then the mean per model;
writes ``docs/experiments/slide-table/slide_table.csv`` and a plot beside it.

    python benchmarks/slide_table.py /work/bench-runs/runs
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from _results import line_panels, write_rows
from zoomnet.data.manifest import read_manifest
from zoomnet.metrics import prediction_metrics
from zoomnet.runs import predict_images
from zoomnet.sources.lazy import LazyImage

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"zoomin": "Zoom-In", "masks": "Zoom-In + masks", "ats": "ATS", "mil": "attention MIL (every tissue tile)"}


def one_run(run: Path, test_csv: Path, seed: int, level0: dict[str, int]) -> dict:
    from zoomnet.sources import lazy

    lazy._OPEN.clear()  # every run opens its slides afresh: no tile decoded by an earlier run is reused
    with tempfile.TemporaryDirectory() as tmp:
        results = predict_images(run, [str(test_csv)], seed=seed, out_csv=Path(tmp) / "p.csv", workers=1)
    metrics = prediction_metrics(results, list(results[0]["probabilities"]))
    return {"accuracy": round(metrics["accuracy"], 4), "auc": round(metrics.get("auc", float("nan")), 4),
            "pixels_read_share": round(statistics.mean(r["pixels_read"] / level0[r["path"]] for r in results), 6),
            "s_per_slide": round(statistics.mean(r["seconds"] for r in results), 3), "slides": len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="the folder of zoomnet bench's runs (camelyon16/ inside)")
    parser.add_argument("--setting", default="camelyon16")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", default=str(ROOT / "docs/experiments/slide-table/slide_table.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.runs) / args.setting
    test_csv = folder / "data" / "test.csv"
    level0 = {}
    for row in read_manifest(test_csv):
        src = LazyImage(row.path, row.given)
        level0[row.given] = src.height * src.width
    rows = []
    for kind, name in KINDS.items():
        for seed in args.seeds:
            run = folder / f"{kind}-seed{seed}"
            if (run / "done").exists():
                rows.append({"model": name, "seed": seed, **one_run(run, test_csv, seed, level0)})
                print(rows[-1], flush=True)
    summary = []
    for name in KINDS.values():
        mine = [r for r in rows if r["model"] == name]
        if mine:
            summary.append({"model": name, "seed": "mean", **{k: round(statistics.mean(r[k] for r in mine), 6)
                                                               for k in ("accuracy", "auc", "pixels_read_share",
                                                                         "s_per_slide", "slides")}})
    write_rows(args.csv, [f"{platform.machine()} CPU, {args.threads} torch threads, torch {torch.__version__}; "
                          f"{args.setting} stand-in test slides; trained runs of {args.runs}"], rows + summary)
    panels = [("test accuracy", {r["model"]: [(r["pixels_read_share"], r["accuracy"])] for r in summary}),
              ("seconds per slide", {r["model"]: [(r["pixels_read_share"], r["s_per_slide"])] for r in summary})]
    line_panels(Path(args.csv).with_suffix(".png"), panels, "share of level-0 pixels read (log)", w=480)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
