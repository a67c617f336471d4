"""``zoomnet doctor``: what an issue report needs — versions, the torch device, CUDA,
OpenSlide and the image codecs this installation can decode."""

from __future__ import annotations

import importlib
import platform
import sys
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[tuple[str, str]]:
    """``(name, value)`` rows describing this installation; never raises."""
    import torch

    from zoomnet import __version__
    from zoomnet.config import available_presets

    rows = [
        ("zoomnet", __version__),
        ("python", f"{sys.version.split()[0]} ({platform.platform()})"),
        ("torch", f"{torch.__version__} ({torch.get_num_threads()} CPU threads)"),
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows += [("device", f"cuda: {names}"), ("CUDA", f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")]
    else:
        built = torch.version.cuda
        rows.append(("device", "cpu (" + (f"CUDA {built} build, but no GPU or driver found" if built else "CPU build of torch") + ")"))
    for dist in ("numpy", "pillow", "tifffile", "zarr", "imagecodecs", "safetensors", "tqdm"):
        rows.append((dist, _version(dist)))
    try:
        codecs = importlib.import_module("imagecodecs")
        names = ("jpeg8", "jpeg2k", "lzw", "zlib", "webp", "jpegxl", "zstd", "lzma")
        found = [n for n in names if getattr(getattr(codecs, n.upper(), None), "available", False)]
        rows.append(("TIFF codecs", ", ".join(found) or "none"))
    except ImportError:
        rows.append(("TIFF codecs", "imagecodecs missing: pip install imagecodecs"))
    try:
        openslide = importlib.import_module("openslide")
        rows.append(("OpenSlide", f"{openslide.__library_version__} (openslide-python {openslide.__version__})"))
    except (ImportError, OSError) as exc:
        rows.append(("OpenSlide", f"not available ({type(exc).__name__}); pip install 'zoomnet[slides]' for NDPI, MIRAX, SCN"))
    rows.append(("tensorboard", _version("tensorboard")))
    rows.append(("presets", ", ".join(available_presets()) or "none found: reinstall zoomnet"))
    return rows


def print_report() -> int:
    """Print :func:`report` as aligned ``name: value`` lines."""
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
