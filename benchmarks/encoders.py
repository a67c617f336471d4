"""Cost of an encoder users bring: one training step of the colon-cancer preset with its
LeNet trained or frozen, and with torchvision's ResNet-18 frozen or trained, at the
sub-tiles' own size (27 px) and at the 224 px it declares (where torchvision imports).

Each variant runs in a fresh process: after a warm-up step, the median wall time of
``--repeats`` steps (``zoomnet.train.training_step``, the step of ``zoomnet train``,
without the contrastive pass) on a batch of ``--batch`` random 500 x 500 images, the peak
resident memory of the steps over the memory before the first one, and the parameters the
optimiser updates. Writes ``docs/experiments/encoders/encoders.csv`` (``--csv``).

    python benchmarks/encoders.py                  # every variant this environment runs
    python benchmarks/encoders.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lenet": [],
    "lenet-frozen": ["model.feature_frozen=true"],
    "resnet18-frozen-27px": ["model.feature=torchvision/resnet18", "model.feature_kwargs={}",
                             "model.feature_frozen=true", "model.feature_size=[27,27]"],
    "resnet18-frozen-224px": ["model.feature=torchvision/resnet18", "model.feature_kwargs={}",
                              "model.feature_frozen=true"],
    "resnet18-trained-224px": ["model.feature=torchvision/resnet18", "model.feature_kwargs={}"],
}


def one(variant: str, batch_size: int, repeats: int, threads: int) -> dict:
    """One variant's row, measured in this process."""
    import numpy as np
    import torch

    from _results import rss_mb
    from zoomnet.config import load_config
    from zoomnet.data.examples import Example
    from zoomnet.model import build_model
    from zoomnet.sources import ArraySource
    from zoomnet.train import make_optimizer, training_step

    torch.set_num_threads(threads)
    config = load_config("colon-cancer", VARIANTS[variant])
    rng = np.random.default_rng(0)
    batch = [Example(ArraySource(rng.integers(0, 256, (500, 500, 3), dtype=np.uint8)), i % 2, None, f"img{i}")
             for i in range(batch_size)]
    torch.manual_seed(0)
    model = build_model(config.model).train()
    optimizer = make_optimizer(model, config.train)
    generator = torch.Generator().manual_seed(0)
    before = rss_mb("VmRSS")
    out = training_step(model, batch, config.train, optimizer, generator)[0]  # warm-up
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        training_step(model, batch, config.train, optimizer, generator)
        times.append(time.perf_counter() - tick)
    step = statistics.median(times)
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return {
        "variant": variant, "feature_input": "x".join(map(str, model.feature_size or (27, 27))),
        "sub_tiles": int(out.leaf_features.shape[0]), "step_s": round(step, 3),
        "ms_per_image": round(1000 * step / batch_size, 1),
        "peak_over_start_mb": round(rss_mb("VmHWM") - before, 1),
        "trained_params": trained, "feature_params": sum(p.numel() for p in model.feature.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", default=str(ROOT / "docs/experiments/encoders/encoders.csv"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.repeats, args.threads)))
        return
    from _results import write_rows

    import torch

    rows, skipped = [], []
    for variant in args.variants:
        if "resnet18" in variant and not _torchvision_imports():
            skipped.append(variant)
            continue
        done = subprocess.run([sys.executable, __file__, "--one", variant, "--batch", str(args.batch), "--repeats",
                               str(args.repeats), "--threads", str(args.threads)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{variant} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.splitlines()[-1]))
        print(rows[-1], flush=True)
    versions = f"torch {torch.__version__}" + (f", torchvision {_torchvision_version()}" if _torchvision_imports() else "")
    comments = [f"{platform.machine()} CPU, {args.threads} threads, {versions}; colon-cancer preset, batch "
                f"{args.batch} of random 500 x 500 images, median of {args.repeats} steps after a warm-up, "
                "each variant in a fresh process"]
    if skipped:
        comments.append(f"not run (torchvision does not import here): {', '.join(skipped)}")
    write_rows(args.csv, comments, rows)
    print(f"wrote {args.csv}")


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


def _torchvision_imports() -> bool:
    try:
        import torchvision.models  # noqa: F401
    except Exception:
        return False
    return True


if __name__ == "__main__":
    main()
