"""``open_image(path)``: the source for a file, chosen by its format."""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

from zoomnet.errors import ImageError
from zoomnet.sources.base import ImageSource
from zoomnet.sources.pillow import CONVERT_HINT as PILLOW_HINT
from zoomnet.sources.pillow import MAX_PIXELS as PILLOW_MAX
from zoomnet.sources.pillow import PillowSource
from zoomnet.sources.slide import VENDOR

PLAIN = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tga"}
TIFF = {".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff"}


def check_file(path: str | os.PathLike) -> Path:
    """``path`` as a regular file, or an :class:`ImageError` that says what it is instead
    (nothing is opened: reading a named pipe would wait forever).

    Raises:
        ImageError: no such file, a folder, a pipe or device, a symbolic-link loop, a NUL
            byte or a Windows-style path on this system.
    """
    import errno
    import stat

    text = os.fspath(path)
    if "\x00" in text:
        raise ImageError(f"{text!r}: the path holds a NUL byte; fix the manifest or the command line")
    try:
        mode = os.stat(text).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError(f"{text}: a loop of symbolic links, not a file; point it at the image") from None
        hint = ""
        if "\\" in text and os.sep == "/":
            hint = " (a Windows path? write folders with / on this system)"
        raise ImageError(
            f"{text}: no such file{hint}; check the path (relative paths are taken from the CSV's folder)"
        ) from None
    if stat.S_ISDIR(mode):
        raise ImageError(f"{text}: a folder, not an image file; give the image inside it (predict takes folders)")
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or socket"
        raise ImageError(f"{text}: {kind}, not an image file; give a regular file")
    return Path(text)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` from the file's header, without decoding the pixels.

    Raises:
        ImageError: a missing, unreadable or unsupported file.
    """
    p = check_file(path)
    suffix = p.suffix.lower()
    if suffix not in PLAIN | TIFF | VENDOR:
        raise ImageError(
        f"{path}: unsupported format {suffix or '(no extension)'!r}; use PNG, JPEG, BMP, TIFF/SVS or an "
        "OpenSlide format (NDPI, MRXS, SCN, BIF)"
    )
    if suffix in VENDOR:
        src = open_image(p)
        return src.height, src.width
    if suffix in TIFF:
        from zoomnet.sources.tiff import TiffSource

        src = TiffSource(p)
        src.close()
        return src.height, src.width
    try:
        with Image.open(p) as img:
            # EXIF orientations 5-8 turn the picture by 90 degrees: the displayed size swaps
            turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            return (img.width, img.height) if turned else (img.height, img.width)
    except Image.DecompressionBombError as exc:  # refused by Pillow from its header alone
        size = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageError(f"{path}: too large to decode whole ({size.group(1) + ' pixels' if size else str(exc)}); "
                         f"{PILLOW_HINT}") from None
    except Exception as exc:  # any decoder failure is the file's, not ours
        raise ImageError(
            f"{path}: cannot read the image ({type(exc).__name__}: {exc}); the file is corrupt, "
            "truncated or not an image: re-export it"
        ) from None


def open_image(path: str | os.PathLike, fill: float = 0.0, max_pixels: int = 256_000_000) -> ImageSource:
    """Open ``path`` lazily where the format allows.

    Args:
        path: an image file.
        fill: raw pixel value returned outside the image (255 suits bright-field slides).
        max_pixels: the most pixels one read may decode (a plain image: the whole image),
            checked before decoding (``data.max_pixels``).

    Raises:
        ImageError: a missing, unreadable or unsupported file, with the fix.
    """
    p = check_file(path)
    suffix = p.suffix.lower()
    if suffix in PLAIN:
        return PillowSource(p, fill=fill, max_pixels=min(max_pixels, PILLOW_MAX))
    if suffix in TIFF:
        from zoomnet.sources.tiff import TiffSource

        return TiffSource(p, fill=fill, max_pixels=max_pixels)
    if suffix in VENDOR:
        from zoomnet.sources.slide import OpenSlideSource

        return OpenSlideSource(p, fill=fill, max_pixels=max_pixels)
    raise ImageError(
        f"{path}: unsupported format {suffix or '(no extension)'!r}; use PNG, JPEG, BMP, TIFF/SVS or an "
        "OpenSlide format (NDPI, MRXS, SCN, BIF)"
    )
