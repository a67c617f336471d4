"""Cell pooling: band-matrix products against linear-time sums, in one run.

Logsumexp pooling of per-pixel attention logits into cells (``zoomnet.core.geometry``) sums
each cell's member pixels. It used to multiply the ``(g, v)`` membership matrices
(``rows @ mass @ cols.T``); it now sums with ``index_add`` (cells that partition the pixels)
or ``index_select`` (one pixel per cell), the matrix product left as the fallback. For the
``colon-cancer`` bench setting's Zoom-In and ATS on square images, untrained weights, one
torch thread, this prints the FLOPs that ``FlopCounterMode`` sees, the pooling additions
counted as one per summed element (``zoomnet.bench.flop_counter``, less what
``FlopCounterMode`` sees) and the best of 3 inference times, with the
matrix products forced and with the linear pooling; rows go to
``docs/experiments/pooling/pooling.csv``.

    python benchmarks/pooling.py --sizes 2048 4096
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from _results import write_rows
from zoomnet.bench import setting_config
from zoomnet.bench import flop_counter
from zoomnet.core.geometry import AxisPool
from zoomnet.model import build_model
from zoomnet.sources.held import NumpySource

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--out", default=str(ROOT / "docs/experiments/pooling/pooling.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    linear = AxisPool.of.__func__
    matrix = classmethod(lambda cls, member: cls(member, None, None))  # force the product
    rows = []
    for size in args.sizes:
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        for kind in ("ats", "zoomin"):
            for mode in ("matrix", "linear"):
                AxisPool.of = classmethod(linear) if mode == "linear" else matrix
                config = setting_config("colon-cancer", kind)
                torch.manual_seed(0)
                model = build_model(config.model).eval()
                source = NumpySource(image, scales=tuple(level.scale for level in config.model.levels))

                def run():
                    return model.predict([source], generator=torch.Generator().manual_seed(0))

                with FlopCounterMode(display=False) as fc:
                    run()
                with flop_counter() as fc_all:
                    run()
                run()
                times = []
                for _ in range(3):
                    tick = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - tick)
                row = {"size": size, "model": kind, "pooling": mode, "counter_mflops": round(fc.get_total_flops() / 1e6, 1),
                       "pooling_adds_m": round((fc_all.get_total_flops() - fc.get_total_flops()) / 1e6, 3), "ms": round(min(times) * 1000, 1)}
                print(row, flush=True)
                rows.append(row)
    AxisPool.of = classmethod(linear)
    write_rows(args.out, [f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"], rows)


if __name__ == "__main__":
    main()
