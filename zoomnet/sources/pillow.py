"""Plain images (PNG, JPEG, BMP, ...) decoded by Pillow and held in memory.

Images are read as displayed: an EXIF orientation (a phone or camera JPEG turned on its
side) is applied. Modes are normalised to 8-bit RGB: grayscale is repeated to three channels, RGBA and LA
drop their alpha, palette images are expanded, 16-bit and 32-bit grayscale are scaled
from their full range to 0..255. Images above ``MAX_PIXELS`` are refused: such an image
belongs in a pyramidal TIFF, which zoomnet reads lazily.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from zoomnet.errors import ImageError
from zoomnet.sources.array import ArraySource
from zoomnet.sources.base import FileBacked

MAX_PIXELS = 100_000_000
CONVERT_HINT = (
    "convert it to a pyramidal TIFF, e.g. `vips tiffsave IN OUT.tif --tile --pyramid "
    "--compression jpeg`"
)


def to_rgb_array(img: Image.Image, name: str) -> np.ndarray:
    """A Pillow image as ``(H, W, 3)`` uint8 (see the module docstring for the rules)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode in ("1", "L", "P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "La", "RGBa"):
        img = img.convert("RGB")
    elif mode != "RGB":
        raise ImageError(f"{name}: unsupported image mode {mode!r}; save it as 8-bit RGB or grayscale")
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns otherwise)


class PillowSource(ArraySource, FileBacked):
    """A plain image file, decoded once into memory.

    Args:
        path: the file.
        fill: raw value outside the image.
        max_pixels: larger images are refused with a message to convert them.
    """

    def __init__(self, path: str | os.PathLike, fill: float = 0.0, max_pixels: int = MAX_PIXELS):
        self.path = str(path)
        name = self.path
        if not Path(path).is_file():
            raise ImageError(f"{name}: no such file; check the path (relative paths are taken from the CSV's folder)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    if img.width * img.height > max_pixels:
                        raise ImageError(
                            f"{name}: {img.width}x{img.height} is too large to decode whole "
                            f"(limit {max_pixels:,} pixels); {CONVERT_HINT}"
                        )
                    img.load()
                    array = to_rgb_array(ImageOps.exif_transpose(img), name)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{name}: too large to decode whole; {CONVERT_HINT}") from None
        except Exception as exc:  # decoders raise OSError, SyntaxError, zlib.error, EOFError, struct.error ...
            raise ImageError(
                f"{name}: cannot read the image ({type(exc).__name__}: {exc}); the file is corrupt, "
                "truncated or not an image: re-export it"
            ) from None
        super().__init__(array, fill=fill)
        self.count_read(self.height * self.width, os.path.getsize(path))  # decoded whole
