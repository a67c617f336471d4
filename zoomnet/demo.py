"""``zoomnet demo`` (and ``make demo``): the main job on a synthetic set, through the command
line, each step printed as the command a user would type: ``make-data tiny-objects``,
``train --config tiny-objects``, ``evaluate`` and ``predict --heatmaps``.

The images are 512x512 with 24-32 px objects; an image is positive iff it holds a ring, and
every image holds filled discs of the same colour and size, so the label needs the
full-resolution sub-tiles. The ``tiny-objects`` preset says which settings and why
(docs/design.md, "Training dynamics").
"""

from __future__ import annotations

import csv
from pathlib import Path


def run_demo(out_dir: str | Path = "demo-output", num: int = 534, epochs: int | None = None, seed: int = 0,
             heatmaps: int = 4, extra: list[str] | None = None) -> int:
    """Make the data, train, evaluate, predict with heatmaps; returns the first non-zero exit
    code (0 when every step succeeded). ``extra``: more flags for ``train``."""
    from zoomnet.cli import main

    out = Path(out_dir)
    data, run = out / "data", out / "run"
    steps = [
        ["make-data", "tiny-objects", str(data), "--num", str(num), "--seed", str(seed)],
        ["train", "--config", "tiny-objects", "--train", str(data / "train.csv"), "--val", str(data / "val.csv"),
         "--out", str(run), "--seed", str(seed), *(["--epochs", str(epochs)] if epochs else []),
         "--force", *(extra or [])],  # the demo's own run: a second `make demo` starts it afresh
        ["evaluate", str(run), str(data / "test.csv"), "--deterministic"],
    ]
    for argv in steps:
        print(f"$ zoomnet {' '.join(argv)}", flush=True)
        code = main(argv)
        if code:
            return code
    with open(data / "test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picks = [r for r in rows if r["label"] == "positive"][: (heatmaps + 1) // 2]
    picks += [r for r in rows if r["label"] == "negative"][: heatmaps // 2]
    picks += [r for r in rows if r not in picks][: heatmaps - len(picks)]  # a split short of one class
    argv = ["predict", str(run), *[str(data / r["path"]) for r in picks], "--heatmaps", str(out / "heatmaps"),
            "--deterministic"]
    print(f"$ zoomnet {' '.join(argv)}", flush=True)
    return main(argv)
