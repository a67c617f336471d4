"""Zoom-In's inference time over ATS's in the colon setting, the two runs alternated.

``zoomnet bench colon-cancer`` times each model's repeats one after the other, so on a
shared machine a change of load between the two blocks moves the ratio by more than the
gap being measured (1.1x to 1.9x on the 2-core development machine in one hour). Here each
round runs Zoom-In once and ATS once on the same bench image and untrained weights (seed
0), in alternating order, and the figure is the median over rounds of the per-round ratio.
Writes ``docs/benchmarks/colon-ratio.csv`` (``--csv``).

    python benchmarks/colon_ratio.py --rounds 200
    PYTHONPATH=<other checkout> python benchmarks/colon_ratio.py   # an older commit, same script
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from _results import alternated_arguments, write_rows
from zoomnet.bench import bench_image, setting_config
from zoomnet.model import build_model
from zoomnet.sources.held import NumpySource

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = alternated_arguments(__doc__, ROOT / "docs/benchmarks/colon-ratio.csv")
    image = bench_image("colon-cancer")
    runs = {}
    for kind in ("zoomin", "ats"):
        config = setting_config("colon-cancer", kind)
        torch.manual_seed(0)
        model = build_model(config.model).eval()
        source = NumpySource(image, scales=tuple(level.scale for level in config.model.levels))
        runs[kind] = (lambda m=model, s=source: m.predict([s], generator=torch.Generator().manual_seed(0)))
        for _ in range(3):  # warm-up
            runs[kind]()
    times: dict[str, list[float]] = {"zoomin": [], "ats": []}
    for r in range(args.rounds):
        for kind in (("zoomin", "ats") if r % 2 == 0 else ("ats", "zoomin")):
            tick = time.perf_counter()
            runs[kind]()
            times[kind].append((time.perf_counter() - tick) * 1000)
    ratios = [z / a for z, a in zip(times["zoomin"], times["ats"])]
    row = {"rounds": args.rounds, "zoomin_ms": round(statistics.median(times["zoomin"]), 2),
           "ats_ms": round(statistics.median(times["ats"]), 2), "ratio_median": round(statistics.median(ratios), 3),
           "ratio_q1": round(statistics.quantiles(ratios, n=4)[0], 3),
           "ratio_q3": round(statistics.quantiles(ratios, n=4)[2], 3)}
    print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    write_rows(args.csv, [f"colon-cancer setting, 500x500, untrained (seed 0), one image, rounds alternated; "
                          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads"],
               [row])


if __name__ == "__main__":
    main()
