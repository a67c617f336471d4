"""Writing a benchmark's rows: comment lines saying what ran where, then a CSV."""

from __future__ import annotations

import csv
from pathlib import Path


def write_rows(path: str | Path, comments: list[str], rows: list[dict], keys: list[str] | None = None) -> None:
    """``# comment`` lines, then ``rows`` under the header ``keys`` (default: the first row's);
    a row without a key leaves its cell empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = keys or list(rows[0])
    with open(path, "w", newline="") as fh:
        for line in comments:
            fh.write(f"# {line}\n")
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
