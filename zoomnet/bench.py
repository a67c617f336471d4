"""``zoomnet bench SETTING --skip-training``: the paper's Table 1 cost columns, measured in one
harness: FLOPs, attention FLOPs, peak inference memory and time per image, for Zoom-In,
ATS (lazy source), ATS as published (holding the full-resolution image), a CNN on the
full-resolution image and a CNN on a downsampled one. Untrained weights with a fixed seed:
cost does not depend on the weights.

Methods:
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one inference;
  ``attention_flops`` is everything except the feature net ``f`` and the classifier ``g``.
- Peak memory: :class:`PeakTensorMemory`, the peak of the bytes held by live tensor storages
  created during the inference (weights excluded: they exist before). Every input tensor a
  method holds counts: ``ats-fullres`` and the CNNs hold the image as a tensor; Zoom-In and
  ATS read through a lazy source, whose crops count once they are tensors. On CUDA
  ``torch.cuda.max_memory_allocated`` would be the equivalent.
- Time: two warm-up runs, then the median of repeated runs; the torch thread count is
  printed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from zoomnet.core.geometry import Box
from zoomnet.errors import UserError

MODELS = ["zoomin", "ats", "ats-fullres", "cnn", "cnn-downsampled"]
COLUMNS = ["model", "accuracy", "accuracy_std", "flops", "attention_flops", "peak_memory_mb", "ms_per_image",
           "train_images_per_s"]


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


class NumpySource:
    """A lazy in-memory source: the image stays a numpy array; a read is cropped and, for a
    view, area-resampled in uint8 before it becomes a tensor, as a pyramid level of a tiled
    file would give it. Only what a method reads counts."""

    def __init__(self, image: np.ndarray, fill: float = 0.0):
        self.image = image
        self.height, self.width = image.shape[:2]
        self.channels, self.fill = 3, float(fill)

    def read(self, box: Box, out_size=None) -> torch.Tensor:
        from PIL import Image

        top, left, h, w = (int(v) for v in box)
        crop = np.full((h, w, 3), self.fill, dtype=np.uint8)
        ya, yb, xa, xb = max(top, 0), min(top + h, self.height), max(left, 0), min(left + w, self.width)
        if yb > ya and xb > xa:
            crop[ya - top : yb - top, xa - left : xb - left] = self.image[ya:yb, xa:xb]
        if out_size is not None and tuple(out_size) != (h, w):
            crop = np.asarray(Image.fromarray(crop).resize((out_size[1], out_size[0]), Image.BOX))
        return torch.from_numpy(crop.copy()).permute(2, 0, 1).contiguous().float()


class HeldSource:
    """ATS as published: the whole full-resolution image held as one tensor."""

    def __init__(self, image: np.ndarray):
        self.tensor = torch.from_numpy(image).permute(2, 0, 1).float()  # (C, H, W), counted
        self.channels, self.height, self.width = self.tensor.shape
        self.fill = 0.0

    def read(self, box: Box, out_size=None) -> torch.Tensor:
        from zoomnet.sources.array import crop_with_fill, resize

        pixels = crop_with_fill(self.tensor, Box(*box), self.fill)
        return pixels if out_size is None else resize(pixels, tuple(out_size))


@dataclass
class Setting:
    """A benchmark setting: image size, the Zoom-In preset, ATS's and the small CNN's scales."""

    size: int
    preset: str | None
    ats_scale: float
    cnn_scale: float
    image: str


SETTINGS = {
    "colon-cancer": Setting(500, "colon-cancer", 0.2, 0.2, "tiny"),
    "needles": Setting(1024, "needle-camelyon", 0.5, 0.25, "needles"),
    "megapixel-mnist": Setting(1500, None, 0.12, 0.12, "mnist"),
}


def setting_config(name: str, kind: str):
    """The run configuration of one model of a setting (untrained, 2 classes; 10 for MNIST)."""
    from zoomnet.config import config_from_dict, defaults, load_config

    s = SETTINGS[name]
    if s.preset:
        config = load_config(s.preset)
    else:  # Megapixel MNIST: ATS's view scale and patches; Zoom-In zooms in twice to them
        data = defaults()
        data["model"].update(levels=[
            {"scale": 0.06, "region": [300, 300], "stride": "tiled"},
            {"scale": 0.2, "region": [50, 50], "stride": "dense"},
        ], samples=10, num_classes=10)
        data["ats_scale"] = 0.12
        config = config_from_dict(data)
    data = config.to_dict()
    data["ats_scale"] = s.ats_scale
    if kind in ("ats", "ats-fullres"):
        data["model"]["kind"] = "ats"
    elif kind in ("cnn", "cnn-downsampled"):
        data["model"]["kind"] = "cnn"
        data["model"]["cnn_scale"] = 1.0 if kind == "cnn" else s.cnn_scale
    return config_from_dict(data, f"bench {name}")


def bench_image(name: str, seed: int = 0) -> np.ndarray:
    """One image of the setting's kind (uint8 RGB)."""
    s = SETTINGS[name]
    rng = np.random.default_rng(seed)
    if s.image == "tiny":
        from zoomnet.data.synthetic import TinyObjects, make_tiny_objects

        return make_tiny_objects(1, TinyObjects(size=s.size), seed=seed, positive_fraction=1.0)[0].source.image.permute(1, 2, 0).numpy()
    if s.image == "needles":
        from zoomnet.data.writers import histology_texture, needles_image

        return needles_image(rng, histology_texture(), s.size, True)[0]
    from zoomnet.data.writers import megapixel_mnist_image, mnist_digits

    digits, labels = mnist_digits()
    img, _ = megapixel_mnist_image(rng, digits, labels, np.arange(len(labels)), s.size, 3)
    return np.repeat(img[..., None], 3, axis=2)


def measure(name: str, kind: str, repeats: int = 5) -> dict:
    """FLOPs, attention FLOPs, peak memory and time per image of one model."""
    from zoomnet.model import build_model

    config = setting_config(name, kind)
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    image = bench_image(name)

    def run():
        src = HeldSource(image) if kind in ("ats-fullres", "cnn", "cnn-downsampled") else NumpySource(image)
        return model.predict([src], generator=torch.Generator().manual_seed(0))

    with FlopCounterMode(display=False) as fc:
        run()
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    total = fc.get_total_flops()
    row = {"model": kind, "flops": total}
    if not kind.startswith("cnn"):
        row["attention_flops"] = total - counts.get("ZoomIn.feature", 0) - counts.get("ZoomIn.classifier", 0)
    with PeakTensorMemory() as mem:
        run()
    row["peak_memory_mb"] = round(mem.peak / 2**20, 3)
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        run()
        times.append((time.perf_counter() - tick) * 1000)
    row["ms_per_image"] = round(statistics.median(times), 2)
    return row


def run_bench(name: str, models: list[str] | None = None, repeats: int = 5) -> list[dict]:
    """Measure every model of a setting; print CSV (comment lines first) and return the rows."""
    if name not in SETTINGS:
        raise UserError(f"bench {name}: unknown setting; choose one of: {', '.join(SETTINGS)}")
    rows = [measure(name, kind, repeats) for kind in (models or MODELS)]
    print(f"# setting: {name}, {SETTINGS[name].size}x{SETTINGS[name].size}; untrained weights, seed 0")
    print(f"# machine: {platform.platform()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(",".join(COLUMNS))
    for row in rows:
        print(",".join(str(row.get(c, "")) for c in COLUMNS))
    return rows
