"""Manifests: a CSV with columns ``path,label`` (and optionally ``mask``), one image a row.

Paths are absolute or relative to the CSV's folder. Labels are class names or integers; the
class list is the sorted set of training labels (numerically sorted when all are integers)
unless the config gives one, and it is saved with the run. Images open lazily
(:class:`zoomnet.sources.lazy.LazyImage`), masks map to their image's frame
(:class:`zoomnet.sources.mask.MaskSource`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from zoomnet.data.examples import Example
from zoomnet.errors import UserError
from zoomnet.sources.lazy import LazyImage
from zoomnet.sources.mask import MaskSource


@dataclass
class Row:
    """One manifest row: the image path as written, resolved, its label and mask."""

    given: str
    path: Path
    label: str
    mask: Path | None


def shown(text: str) -> str:
    """``text`` as an error message may show it on one line: quoted and escaped where it
    holds a line break or another control character.

    >>> shown("a.png"), shown("a\\nb.png")
    ('a.png', "'a\\\\nb.png'")
    """
    return repr(text) if any(not c.isprintable() for c in text) else text


def read_manifest(csv_path: str | Path, labels: bool = True) -> list[Row]:
    """Read and check a manifest CSV.

    Args:
        labels: the ``label`` column is required (False: optional, for prediction; rows
            without one get the label ``""``).

    Raises:
        UserError: missing file, missing columns, no rows, an empty path or label.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: no such CSV file; give a CSV with columns path,label")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            raw = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: not a readable CSV ({exc}); save it as UTF-8 text with columns path,label") from None
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise UserError(f"{csv_path}: the column {repeated[0]!r} appears twice in the first line; give each column "
                        "once (path,label[,mask])")
    missing = [c for c in (("path", "label") if labels else ("path",)) if c not in columns]
    if missing:
        found = ", ".join(columns) if columns else "none"
        raise UserError(
            f"{csv_path}: missing column {' and '.join(repr(m) for m in missing)} (found: {found}); "
            "the first line must name the columns path,label[,mask]"
        )
    rows = []
    for n, rec in enumerate(raw, start=2):
        rec = {k.strip(): (v or "").strip() for k, v in rec.items() if k is not None}
        if not rec.get("path"):
            raise UserError(f"{csv_path}: line {n} has an empty path; give every row an image path")
        if labels and rec.get("label", "") == "":
            raise UserError(f"{csv_path}: line {n} ({shown(rec['path'])}) has an empty label; give every row a label")
        given = rec["path"]
        path = Path(given) if Path(given).is_absolute() else csv_path.parent / given
        mask = rec.get("mask") or None
        mask_path = None if mask is None else (Path(mask) if Path(mask).is_absolute() else csv_path.parent / mask)
        rows.append(Row(given, path, rec.get("label", ""), mask_path))
    if not rows:
        raise UserError(f"{csv_path}: the CSV has no rows; add one line path,label per image")
    return rows


def class_list(rows: list[Row]) -> list[str]:
    """Sorted class names (numeric order when every label is an integer)."""
    labels = sorted({r.label for r in rows})
    if all(lab.lstrip("-").isdigit() for lab in labels):
        labels = sorted(labels, key=int)
    return labels


EMPTY_NAMES = ("negative", "normal", "background", "empty", "no-sign", "no-object")


def default_reference(classes: list[str]) -> str | None:
    """The negative class: one named ``negative``, ``normal``, ``background``, ``empty``,
    ``no-sign`` or ``no-object`` (any case, ``-`` or ``_``), or, with two classes only,
    ``0``."""
    names = EMPTY_NAMES + (("0",) if len(classes) == 2 else ())
    for name in names:
        for c in classes:
            if c.lower().replace("_", "-") == name:
                return c
    return None


def resolve_reference(classes: list[str], given: str | None) -> str | None:
    """The reference (negative) class of a run, or None for the multi-class terms.

    ``given`` (``data.reference_class``) wins; ``"none"`` asks for no reference class. Left
    unset, a class whose name says its images hold nothing (``negative``, ``normal``,
    ``background``, ``no-sign`` ...; see ``default_reference``), or ``0`` in a binary set;
    otherwise none (the digit "0" of Megapixel MNIST is a class, not "nothing").

    >>> resolve_reference(["negative", "positive"], None)
    'negative'
    >>> resolve_reference(["50", "70", "80", "no-sign"], None)
    'no-sign'
    >>> resolve_reference(["cat", "No_Object"], None)
    'No_Object'
    >>> resolve_reference([str(d) for d in range(10)], None) is None
    True

    Raises:
        UserError: ``given`` names no class.
    """
    if given is None:
        return default_reference(classes)
    if given.lower() == "none":
        return None
    if given not in classes:
        raise UserError(f"data.reference_class={given!r} is not a class ({', '.join(classes)}); fix the name, or 'none'")
    return given


def load_examples(
    csv_path: str | Path, classes: list[str], fill: float = 0.0, role: str = "training",
    target_mpp: float | None = None, max_pixels: int = 256_000_000,
) -> list[Example]:
    """Examples of a manifest, labels mapped to ``classes``.

    Raises:
        UserError: a label not in ``classes``, a missing or unreadable image.
    """
    rows = read_manifest(csv_path)
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for r in rows:
        if r.label not in index:
            raise UserError(
                f"{csv_path}: label {r.label!r} of {shown(r.given)} is not in the class list "
                f"({', '.join(classes)}) of the {role} run; fix the label or retrain with it"
            )
        image = LazyImage(r.path, r.given, fill, target_mpp, max_pixels)
        mask = None if r.mask is None else MaskSource(LazyImage(r.mask, str(r.mask), max_pixels=max_pixels), image)
        out.append(Example(image, index[r.label], mask, r.given))
    return out
