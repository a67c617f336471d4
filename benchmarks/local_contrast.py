"""The contrast prior's neighbourhood means: running sums along each axis (what
``zoomnet.nets.attention.local_contrast`` does) against the depthwise convolution of ones
it replaced, forward and backward, alternated round by round on the same views; the
figure is the median time of each and their ratio. Writes
``docs/benchmarks/local_contrast.csv`` (``--csv``).

    python benchmarks/local_contrast.py
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from _results import alternated_arguments, write_rows
from zoomnet.nets.attention import _inside_counts, local_contrast

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # (M, C, h, w) views, and where they occur
    "colon level-2 tile view": (1, 3, 50, 50),
    "ATS colon view": (1, 3, 100, 100),
    "needle-camelyon tile views, one step": (16, 3, 64, 64),
    "megapixel-mnist level-1 views, one step": (8, 3, 150, 150),
}


def by_convolution(view: torch.Tensor, radius: int = 3, cap: float = 3.0) -> torch.Tensor:
    """The previous form: neighbourhood sums by a depthwise convolution of ones."""
    k = 2 * radius + 1
    m, c, h, w = view.shape
    sums = torch.nn.functional.conv2d(view, view.new_ones(c, 1, k, k), padding=radius, groups=c)
    return (view - sums / _inside_counts(h, w, radius, view.device, view.dtype)).abs().mean(dim=1).clamp(max=cap)


def main() -> None:
    args = alternated_arguments(__doc__, ROOT / "docs/benchmarks/local_contrast.csv")
    rows = []
    for name, shape in SHAPES.items():
        view = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
        torch.testing.assert_close(local_contrast(view), by_convolution(view), rtol=0, atol=1e-5)
        forms = {"running_sums": local_contrast, "convolution": by_convolution}
        times: dict[str, list[float]] = {k: [] for k in forms}
        for r in range(args.rounds + 5):
            for key in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
                tick = time.perf_counter()
                forms[key](view).sum().backward()
                if r >= 5:  # the first rounds warm up
                    times[key].append((time.perf_counter() - tick) * 1000)
        run, conv = statistics.median(times["running_sums"]), statistics.median(times["convolution"])
        row = {"views": name, "shape": "x".join(map(str, shape)), "running_sums_ms": round(run, 3),
               "convolution_ms": round(conv, 3), "speedup": round(conv / run, 2)}
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        rows.append(row)
    write_rows(args.csv, [f"local_contrast forward + backward, medians of {args.rounds} alternated rounds; "
                          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads"],
               rows)


if __name__ == "__main__":
    main()
