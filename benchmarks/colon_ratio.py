"""Zoom-In's inference time over ATS's in the colon setting, the two runs alternated.

``zoomnet bench colon-cancer`` times each model's repeats one after the other, so on a
shared machine a change of load between the two blocks moves the ratio by more than the
gap being measured (1.1x to 1.9x on the 2-core development machine in one hour). Here each
round runs Zoom-In once and ATS once on the same bench image and untrained weights (seed
0), in alternating order, and the figure is the median over rounds of the per-round ratio.
Writes ``docs/experiments/colon-cancer/colon-ratio.csv`` (``--csv``).

``--view-chunks 1 2 4`` measures Zoom-In with each of these ``model.view_chunk`` values
(how many level-2 tile views go through the attention net in one call; the preset's is
1), each against ATS in its own alternated block, in one run, with Zoom-In's peak tensor
memory for each: the trade between the time and the memory targets.

``--runs ZOOMIN_RUN ATS_RUN --images MANIFEST`` measures trained models instead (run
folders of ``zoomnet train --config colon-cancer``, the second with ``--set
model.kind=ats``): each round takes the next image of the manifest (the first
``--num-images``), read through the same in-memory source; the row also gives how many
tile views Zoom-In's level-2 attention ran on per image (4 at most: a trained level-1
attention that settles on fewer tiles runs fewer).

    python benchmarks/colon_ratio.py --rounds 200
    python benchmarks/colon_ratio.py --rounds 150 --view-chunks 1 2 4 --csv docs/experiments/colon-cancer/colon-view-chunk.csv
    python benchmarks/colon_ratio.py --rounds 300 --runs runs/colon_zi_s0 runs/colon_ats_s0 --images colon/test.csv \
        --csv docs/experiments/colon-cancer/colon-ratio-trained.csv
    PYTHONPATH=<other checkout> python benchmarks/colon_ratio.py   # an older commit, same script
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from _results import alternated_arguments, write_rows
from zoomnet.bench import PeakTensorMemory, bench_image, setting_config
from zoomnet.model import build_model
from zoomnet.sources.held import NumpySource

ROOT = Path(__file__).resolve().parents[1]


def built(kind: str, overrides: list[str] | None = None):
    """The untrained model (seed 0) of the colon setting and its config."""
    config = setting_config("colon-cancer", kind, overrides)
    torch.manual_seed(0)
    return build_model(config.model).eval(), config


def timed(model, config, image) -> Callable[[], object]:
    """One inference on the image, warmed up."""
    source = NumpySource(image, scales=tuple(level.scale for level in config.model.levels))
    run = lambda: model.predict([source], generator=torch.Generator().manual_seed(0))  # noqa: E731
    for _ in range(3):
        run()
    return run


def trained_runs(run_dirs: list[str], manifest: str, num: int) -> tuple[dict[str, Callable[[int], object]], list]:
    """One inference of each trained model on image ``r`` of the first ``num`` of the
    manifest (warmed up), and the list of the Zoom-In outputs' level-2 view counts."""
    import numpy as np
    from PIL import Image

    from zoomnet.data.manifest import read_manifest
    from zoomnet.runs import load_run

    images = [np.asarray(Image.open(row.path).convert("RGB")) for row in read_manifest(manifest)[:num]]
    views: list[int] = []
    runs = {}
    for kind, run_dir in zip(("zoomin", "ats"), run_dirs):
        model, config = load_run(run_dir)
        scales = tuple(level.scale for level in config.model.levels)
        sources = [NumpySource(image, scales=scales) for image in images]

        def run(r: int, model=model, sources=sources, kind=kind):
            out = model.predict([sources[r % len(sources)]], generator=torch.Generator().manual_seed(r))
            if kind == "zoomin" and len(out.parents) > 1:
                views.append(len(out.parents[1][0]))
            return out
        for r in range(len(sources)):
            run(r)
        runs[kind] = run
    views.clear()
    return runs, views


def alternate(runs: dict[str, Callable[..., object]], rounds: int, per_round: bool = False) -> dict:
    """Median ms of each and the median and quartiles of the per-round ratio (``per_round``:
    the runs take the round's number, their image)."""
    times: dict[str, list[float]] = {"zoomin": [], "ats": []}
    for r in range(rounds):
        for kind in (("zoomin", "ats") if r % 2 == 0 else ("ats", "zoomin")):
            tick = time.perf_counter()
            runs[kind](r) if per_round else runs[kind]()
            times[kind].append((time.perf_counter() - tick) * 1000)
    ratios = [z / a for z, a in zip(times["zoomin"], times["ats"])]
    return {"rounds": rounds, "zoomin_ms": round(statistics.median(times["zoomin"]), 2),
            "ats_ms": round(statistics.median(times["ats"]), 2), "ratio_median": round(statistics.median(ratios), 3),
            "ratio_q1": round(statistics.quantiles(ratios, n=4)[0], 3),
            "ratio_q3": round(statistics.quantiles(ratios, n=4)[2], 3)}


def main() -> None:
    def extra(parser) -> None:
        parser.add_argument("--view-chunks", type=int, nargs="*", default=None, help="Zoom-In's model.view_chunk values to compare")
        parser.add_argument("--runs", nargs=2, metavar=("ZOOMIN_RUN", "ATS_RUN"), help="trained run folders to time instead")
        parser.add_argument("--images", help="manifest of the images for --runs (e.g. the test split)")
        parser.add_argument("--num-images", type=int, default=20, help="how many of them, one per round in turn")

    args = alternated_arguments(__doc__, ROOT / "docs/experiments/colon-cancer/colon-ratio.csv", extra=extra)
    if args.runs:
        if not args.images:
            raise SystemExit("--runs needs --images MANIFEST")
        runs, views = trained_runs(args.runs, args.images, args.num_images)
        row = alternate(runs, args.rounds, per_round=True)
        row = {"images": min(args.num_images, args.rounds), **row,
               "zoomin_tile_views_mean": round(statistics.mean(views), 2)}
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        write_rows(args.csv, [f"colon-cancer preset, trained ({args.runs[0]}, {args.runs[1]}), {args.images}, one image per "
                              f"round in turn, rounds alternated; {platform.processor() or platform.machine()}, "
                              f"torch {torch.__version__}, {args.threads} threads"], [row])
        return
    image = bench_image("colon-cancer")
    ats = timed(*built("ats"), image)
    rows = []
    for chunk in args.view_chunks or [None]:
        zoomin = timed(*built("zoomin", None if chunk is None else [f"model.view_chunk={chunk}"]), image)
        row = {}
        if chunk is not None:  # peak after the warm-up, as `zoomnet bench` measures it
            with PeakTensorMemory() as mem:
                zoomin()
            row = {"view_chunk": chunk, "zoomin_peak_mb": round(mem.peak / 2**20, 3)}
        row.update(alternate({"zoomin": zoomin, "ats": ats}, args.rounds))
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        rows.append(row)
    write_rows(args.csv, [f"colon-cancer setting, 500x500, untrained (seed 0), one image, rounds alternated; "
                          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads"],
               rows)


if __name__ == "__main__":
    main()
