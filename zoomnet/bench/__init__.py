"""``zoomnet bench SETTING``: the paper's Table 1 columns, measured in one harness, for
Zoom-In, ATS (lazy source), ATS as published (holding the full-resolution image), a CNN on
the full-resolution image and a CNN on a downsampled one, on every preset's stand-in.

Without ``--skip-training``: the setting's synthetic set is written, ``zoomin``, ``ats`` and
``cnn-downsampled`` are trained for each seed (runs reused when finished), tested
(accuracy, AUC, localization), and the cost columns are measured with the seed-0 weights on
test images (:mod:`.trained`). With it: cost columns with untrained weights on one image
(cost does not depend on the weights, except Zoom-In's through how many tiles its attention
visits). How each column is measured: :mod:`.measure`; the settings: :mod:`.settings`.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from zoomnet.bench.measure import PeakTensorMemory, flop_counter, measure
from zoomnet.bench.settings import MODELS, SETTINGS, bench_image, setting, setting_config
from zoomnet.errors import Option, UserError

__all__ = ["COLUMNS", "MODELS", "SETTINGS", "PeakTensorMemory", "bench_image", "flop_counter", "measure",
           "run_bench", "setting_config"]

COLUMNS = ["model", "accuracy", "accuracy_std", "auc", "flops", "attention_flops", "peak_memory_mb", "ms_per_image",
           "train_images_per_s", "images_hit", "spearman"]


def print_rows(rows: list[dict], header: list[str], out: str | None = None) -> None:
    """Comment lines, then the CSV; the same text to ``out`` if given."""
    lines = [f"# {h}" for h in header] + [",".join(COLUMNS)]
    lines += [",".join("" if row.get(c) is None else str(row.get(c, "")) for c in COLUMNS) for row in rows]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def run_bench(name: str, models: list[str] | None = None, repeats: int = 5, skip_training: bool = True,
              seeds: int = 3, work: str | Path = "bench-runs", overrides: list[str] | None = None,
              epochs: int | None = None, num: int | None = None, size: int | None = None,
              cost_images: int | None = None, out: str | None = None, progress: bool = True) -> list[dict]:
    """Measure every model of a setting; print CSV (comment lines first) and return the rows.

    Raises:
        UserError: an unknown setting or model.
    """
    s = setting(name)
    models = models or list(s.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise UserError(f"{{models}}: unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}",
                        models=Option("models", "bench --models"))
    overrides = list(overrides or [])
    torch.manual_seed(0)
    if skip_training:
        rows = [measure(name, kind, repeats, overrides=overrides) for kind in models]
        what = "untrained weights, seed 0, one image"
    else:
        from zoomnet.bench.trained import run_trained

        rows = run_trained(name, models, seeds, Path(work) / name, overrides, epochs, num, size, repeats,
                           cost_images, progress)
        what = (f"trained: {num or s.num} synthetic images ({s.data}, 60/20/20 split), {epochs or s.epochs} epochs, "
                f"{seeds} seed(s), best validation epoch; accuracy and AUC = test means over seeds (sampled at the "
                f"preset's N); cost columns: seed-0 weights, mean over {cost_images or s.cost_images} test images; "
                "cnn (full resolution) untrained; ats-fullres = the ats models holding the image; "
                "train_images_per_s: seed-0 weights, 4 timed batches after one warm-up, one process")
    side = size or s.size
    header = [f"setting: {name} (preset {s.preset}), {side} px; {what}"
              + (f"; overrides {' '.join(overrides)}" if overrides else ""),
              f"machine: {platform.platform()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads"]
    print_rows(rows, header, out)
    return rows
