"""The contrast prior's neighbourhood means: running sums along each axis (what
``zoomnet.nets.attention.local_contrast`` does) against the depthwise convolution of ones
it replaced, forward and backward, alternated round by round on the same views; the
figure is the median time of each and their ratio. Views that the attention nets get in
the channels-last layout (large ones, on a CPU) are also timed in that layout: the running
sums on a copy in the default layout (what ``local_contrast`` does) against the same sums
strided over the channels, forward only (inference) and forward and backward. Writes
``docs/experiments/attention-prior/local_contrast.csv`` (``--csv``).

    python benchmarks/local_contrast.py
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from _results import alternated_arguments, write_rows
from zoomnet.nets.attention import _contrast, _inside_counts, local_contrast

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


CHANNELS_LAST = {  # views of at least 20,480 values, which conv_layout makes channels-last on a CPU
    "ATS colon view": (1, 3, 100, 100),
    "needle-camelyon level-1 view": (1, 3, 256, 256),
}


def alternated(forms: dict, view: torch.Tensor, rounds: int, backward: bool) -> dict[str, list[float]]:
    """Milliseconds of each form per round, the forms alternated round by round."""
    times: dict[str, list[float]] = {k: [] for k in forms}
    for r in range(rounds + 5):
        for key in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
            tick = time.perf_counter()
            if backward:
                forms[key](view).sum().backward()
            else:
                with torch.no_grad():
                    forms[key](view)
            if r >= 5:  # the first rounds warm up
                times[key].append((time.perf_counter() - tick) * 1000)
    return times


def main() -> None:
    args = alternated_arguments(__doc__, ROOT / "docs/experiments/attention-prior/local_contrast.csv")
    rows = []
    for name, shape in SHAPES.items():
        view = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
        torch.testing.assert_close(local_contrast(view), by_convolution(view), rtol=0, atol=1e-5)
        forms = {"running_sums": local_contrast, "convolution": by_convolution}
        times = alternated(forms, view, args.rounds, backward=True)
        run, conv = statistics.median(times["running_sums"]), statistics.median(times["convolution"])
        row = {"views": name, "shape": "x".join(map(str, shape)), "running_sums_ms": round(run, 3),
               "convolution_ms": round(conv, 3), "speedup": round(conv / run, 2)}
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        rows.append(row)
    for name, shape in CHANNELS_LAST.items():
        view = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
        forms = {"default_layout_copy": local_contrast, "channels_last": lambda v: _contrast(v, 3, 3.0)}
        torch.testing.assert_close(forms["default_layout_copy"](view), forms["channels_last"](view), rtol=0, atol=1e-5)
        for backward in (False, True):
            v = view.detach().requires_grad_(backward)
            times = alternated(forms, v, args.rounds, backward)
            copy, strided = statistics.median(times["default_layout_copy"]), statistics.median(times["channels_last"])
            row = {"views": f"{name}, channels-last, {'forward + backward' if backward else 'forward'}",
                   "shape": "x".join(map(str, shape)), "default_layout_copy_ms": round(copy, 3),
                   "channels_last_ms": round(strided, 3), "speedup": round(strided / copy, 2)}
            print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
            rows.append(row)
    keys = list(dict.fromkeys(k for row in rows for k in row))  # both tables' columns
    write_rows(args.csv, [f"local_contrast forward + backward (channels-last rows: as named), medians of {args.rounds} "
                          f"alternated rounds; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{args.threads} threads"],
               rows, keys)


if __name__ == "__main__":
    main()
