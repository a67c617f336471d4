"""The bench's measures (the paper's Table 1 columns): FLOPs, peak memory and time per image
of one model.

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one inference, which counts
  matrix products and convolutions; the linear-time sums it skips (cell pooling by
  ``sum`` and ``index_add``, the contrast prior's running sums, the weighted sum of the
  features) count one addition per summed element (:func:`flop_counter`).
  ``attention_flops`` is everything except the feature net ``f`` and the classifier ``g``.
- Peak memory: :class:`PeakTensorMemory`, the peak of the bytes held by live tensor storages
  created during the inference (weights excluded: they exist before). Every input tensor a
  method holds counts: ``ats-fullres`` and the CNNs hold the image as a tensor; Zoom-In and
  ATS read through a lazy source, whose crops count once they are tensors. On CUDA
  ``torch.cuda.max_memory_allocated`` would be the equivalent.
- Time: two warm-up runs, then the median of repeated runs.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from zoomnet.bench.settings import bench_image, setting_config
from zoomnet.model import build_model
from zoomnet.sources.held import HeldSource, NumpySource


def _additions(shape_arg: int):
    """A FLOP formula: one addition per element of the argument at ``shape_arg``."""
    def formula(*args, out_shape=None, **kwargs) -> int:
        return math.prod(args[shape_arg])

    return formula


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the linear-time sums the model does instead of
    matrix products: one FLOP per element summed by ``sum``, ``cumsum`` or ``index_add``.

    >>> with flop_counter() as fc:
    ...     _ = torch.ones(4, 6).sum(1) + torch.ones(3).cumsum(0).sum()
    >>> fc.get_total_flops()  # 24 + 3 + 3
    30
    """
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten.sum: _additions(0), aten.cumsum: _additions(0), aten.index_add: _additions(3),
    })


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once among those created inside the block.

    Each op's outputs are registered by storage; a storage is released when the last tensor
    object seen for it is garbage-collected. Tensors that existed before the block
    (weights), views of them, and storages made outside torch's dispatcher
    (``torch.from_numpy``) are not counted, while everything computed from them is.

    >>> with PeakTensorMemory() as m:
    ...     a = torch.zeros(1000)            # 4000 bytes
    ...     b = torch.zeros(2000); del a     # 8000 + 4000 alive at once, then 8000
    ...     c = torch.zeros(500)             # 8000 + 2000
    >>> m.peak
    12000
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage pointer -> live tensor objects
        self._sizes: dict[int, int] = {}

    def _release(self, ptr: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            self.current -= self._sizes.pop(ptr)
            del self._refs[ptr]

    def _track(self, t: torch.Tensor, aliases_input: bool) -> None:
        st = t.untyped_storage()
        ptr, size = st.data_ptr(), st.nbytes()
        if ptr == 0 or size == 0:
            return
        if ptr not in self._refs:
            if aliases_input:  # a view of a tensor from before the block (a weight): not ours
                return
            self._refs[ptr] = 0
            self._sizes[ptr] = size
            self.current += size
            self.peak = max(self.peak, self.current)
        self._refs[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = getattr(func, "_schema", None)
        aliases = bool(schema and any(r.alias_info is not None for r in schema.returns))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                self._track(t, aliases)
        return out


def measure(name: str, kind: str, repeats: int = 5, model: torch.nn.Module | None = None,
            images: list[np.ndarray] | None = None, overrides: list[str] | None = None) -> dict:
    """FLOPs, attention FLOPs, peak memory and time per image of one model.

    Untrained weights (seed 0) on the setting's bench image unless ``model`` and ``images``
    are given; over several images FLOPs and memory are means, time the median of all runs.
    """
    config = setting_config(name, kind, overrides)
    if model is None:
        torch.manual_seed(0)
        model = build_model(config.model)
    model = model.eval()
    images = images if images is not None else [bench_image(name)]
    held = kind in ("ats-fullres", "cnn", "cnn-downsampled")
    flops, attention, peaks, times = [], [], [], []
    for i, image in enumerate(images):
        lazy = None if held else NumpySource(image, scales=tuple(level.scale for level in config.model.levels))

        def run(counted: bool = False):  # the held image is made inside: it is memory the method holds
            src = HeldSource(image) if held else lazy
            if counted:  # predict's own computation under no_grad: inference mode would show the
                # counter composite operations whole, not the temporaries inside them
                with torch.no_grad():
                    return model([src], generator=torch.Generator().manual_seed(i))
            return model.predict([src], generator=torch.Generator().manual_seed(i))

        with flop_counter() as fc:
            run()
        counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
        flops.append(fc.get_total_flops())
        attention.append(flops[-1] - counts.get("ZoomIn.feature", 0) - counts.get("ZoomIn.classifier", 0))
        with PeakTensorMemory() as mem:
            run(counted=True)
        peaks.append(mem.peak)
        for _ in range(2 if i == 0 else 1):
            run()
        for _ in range(repeats):
            tick = time.perf_counter()
            run()
            times.append((time.perf_counter() - tick) * 1000)
    row = {"model": kind, "flops": round(statistics.mean(flops))}
    if not kind.startswith("cnn"):
        row["attention_flops"] = round(statistics.mean(attention))
    row["peak_memory_mb"] = round(statistics.mean(peaks) / 2**20, 3)
    row["ms_per_image"] = round(statistics.median(times), 2)
    return row
