"""The cost of the attention net: the authors' net (three 3x3 convolutions, 3 -> 8 -> 8 -> 1,
``model.attention_head=3x3``, the default) against zoomnet 0.1.0's (a third 8 -> 8
convolution and a 1x1 head, ``model.attention_head=1x1``), for Zoom-In and ATS on every
bench setting: FLOPs, attention FLOPs and peak memory of one inference (untrained weights,
the setting's bench image), and the time per image, the two nets alternated round by round
in one process so that the machine's load falls on both alike. Rows go to
``docs/experiments/attention-net/cost.csv``.

    python benchmarks/attention_net.py                       # every setting
    python benchmarks/attention_net.py colon-cancer --rounds 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from _results import write_rows
from zoomnet.bench import SETTINGS, bench_image, flop_counter, setting_config
from zoomnet.bench.measure import PeakTensorMemory
from zoomnet.model import build_model
from zoomnet.runtime.allocator import settle_heap
from zoomnet.sources.held import NumpySource

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("3x3", "1x1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", default=str(ROOT / "docs/experiments/attention-net/cost.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settle_heap()
    rows = []
    for name in args.settings:
        image = bench_image(name)
        for kind in ("zoomin", "ats"):
            runs = {}
            for head in HEADS:
                config = setting_config(name, kind, [f"model.attention_head={head}"])
                torch.manual_seed(0)
                model = build_model(config.model).eval()
                source = NumpySource(image, scales=tuple(level.scale for level in config.model.levels))
                runs[head] = (model, source)
            row = {"setting": name, "model": kind}
            for head, (model, source) in runs.items():
                def run(model=model, source=source):
                    return model.predict([source], generator=torch.Generator().manual_seed(0))
                with flop_counter() as fc:
                    run()
                counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
                total = fc.get_total_flops()
                with PeakTensorMemory() as mem, torch.no_grad():
                    model([source], generator=torch.Generator().manual_seed(0))
                row[f"mflops_{head}"] = round(total / 1e6, 2)
                row[f"attention_mflops_{head}"] = round(
                    (total - counts.get("ZoomIn.feature", 0) - counts.get("ZoomIn.classifier", 0)) / 1e6, 2)
                row[f"peak_mb_{head}"] = round(mem.peak / 2**20, 3)
                run()
            times = {head: [] for head in HEADS}
            for _ in range(args.rounds):  # alternated: the load of the machine falls on both
                for head, (model, source) in runs.items():
                    tick = time.perf_counter()
                    model.predict([source], generator=torch.Generator().manual_seed(0))
                    times[head].append(time.perf_counter() - tick)
            for head in HEADS:
                row[f"ms_{head}"] = round(statistics.median(times[head]) * 1000, 2)
            row["time_ratio"] = round(row["ms_3x3"] / row["ms_1x1"], 3)
            row["attention_flops_ratio"] = round(row["attention_mflops_3x3"] / max(row["attention_mflops_1x1"], 1e-9), 3)
            print(row, flush=True)
            rows.append(row)
    write_rows(args.csv, [f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
                          f"torch {torch.__version__}; untrained weights, seed 0, one bench image; time: median "
                          f"of {args.rounds} alternated rounds"], rows)


if __name__ == "__main__":
    main()
