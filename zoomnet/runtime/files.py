"""Whether the process may write where it was asked to, found before any work is done."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from zoomnet.errors import Option, UserError


def _write_probe(folder: Path) -> None:
    """Create and remove an empty file in ``folder`` (raises OSError where that fails)."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".zoomnet-write-", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)


def writable_folder(folder: Path, option: Option) -> None:
    """Make sure ``folder`` exists (created if need be) and a file can be written in it.

    Raises:
        UserError: it is a file, or it cannot be created or written (naming ``option``).
    """
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{{option}} {folder}: a file, not a folder; give a folder for the outputs", option=option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_probe(folder)
    except OSError as exc:
        raise UserError(f"{{option}} {folder}: cannot write there ({exc.strerror or exc}); give a folder this user "
                        "may write to", option=option) from None


def writable_target(path: Path, option: Option) -> None:
    """Make sure ``path`` (a folder to create later, or one that exists) can be written,
    without creating anything: its nearest existing ancestor must be a folder this process
    can write a file in.

    Raises:
        UserError: naming ``option``.
    """
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{{option}} {path}: {ancestor} is a file, not a folder; give a folder path", option=option)
    try:
        _write_probe(ancestor)
    except OSError as exc:
        raise UserError(f"{{option}} {path}: cannot write in {ancestor} ({exc.strerror or exc}); give a folder this "
                        "user may write to", option=option) from None
