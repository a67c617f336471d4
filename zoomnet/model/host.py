"""The host boundary of a pass: the one place where device values are read back.

A GPU runs ahead of the host until the host asks for a value. A pass asks once per level:
for the cells it drew (the reader needs their boxes); everything else it does on the host
(which image, which box, how often) is bookkeeping in NumPy and Python on those values, and
everything else on the device stays there (weights, features, losses). ``reads`` counts
the reads, so that a test can hold the budget without a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

reads = 0  # device-to-host reads made through to_host, for the synchronisation budget's test


def to_host(values: torch.Tensor) -> np.ndarray:
    """``values`` as a NumPy array on the host (a synchronisation where they live on a GPU)."""
    global reads
    reads += 1
    return values.detach().cpu().numpy()


class HostValues:
    """Device values read to the host once, when first asked for (a trace's sample weights:
    pictures and GeoJSON ask, training steps do not)."""

    def __init__(self, values: torch.Tensor):
        self._tensor = values.detach()
        self._values: list[float] | None = None

    def __getitem__(self, i: int) -> float:
        if self._values is None:
            self._values = self._tensor.tolist()
        return self._values[i]
