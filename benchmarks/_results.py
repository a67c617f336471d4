"""Writing a benchmark's rows: comment lines saying what ran where, then a CSV."""

from __future__ import annotations

import argparse
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


def alternated_arguments(doc: str, csv_path: str | Path, extra=None) -> argparse.Namespace:
    """The arguments of a benchmark that alternates two forms round by round: ``--rounds``,
    ``--threads`` (set for torch here) and ``--csv`` (default ``csv_path``); ``extra(parser)``
    adds a benchmark's own."""
    import torch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", default=str(csv_path))
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args
