"""The main table of docs/results.md, from the bench's CSVs in docs/results/ (one a
setting, written by ``zoomnet bench SETTING --csv docs/results/SETTING.csv``).

    python benchmarks/results_table.py          # prints the markdown table
"""

from __future__ import annotations

import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the paper's Table 1 (Zoom-In / ATS, accuracy %) on the real data sets each stand-in imitates
PAPER = {"colon-cancer": "95.0 / 90.7", "needles": "76.0 / 72.5", "needles-hard": "76.0 / 72.5",
         "traffic-signs": "91.2 / 90.5", "fmow": "72.9 / 71.1", "camelyon16": "81.3 / —"}
ORDER = ["colon-cancer", "needles", "needles-hard", "traffic-signs", "fmow", "camelyon16", "megapixel-mnist",
         "tiny-objects"]


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["model"]: r for r in csv.DictReader(line for line in fh if not line.startswith("#"))}


def _acc(r: dict | None) -> str:
    if not r or not r.get("accuracy"):
        return "—"
    std = f" ± {float(r['accuracy_std']):.3f}" if r.get("accuracy_std") else ""
    return f"{float(r['accuracy']):.3f}{std}"


def main() -> None:
    from zoomnet.bench import SETTINGS

    print("| setting (preset) | Zoom-In | ATS | CNN, downsampled | paper Zoom-In / ATS | peak MB Zoom-In / ATS / CNN | "
          "ms per image Zoom-In / ATS |")
    print("|---|---|---|---|---|---|---|")
    for name in ORDER:
        path = ROOT / "docs/results" / f"{name}.csv"
        if not path.is_file():
            continue
        rows, s = _rows(path), SETTINGS[name]
        z, a = rows.get("zoomin"), rows.get("ats")
        cnn = rows.get("cnn") or rows.get("cnn-downsampled")
        memory = " / ".join(f"{float(r['peak_memory_mb']):.3g}" if r else "—" for r in (z, a, cnn))
        ms = " / ".join(f"{float(r['ms_per_image']):.3g}" if r else "—" for r in (z, a))
        print(f"| `{name}` (`{s.preset}`) | {_acc(z)} | {_acc(a)} | {_acc(rows.get('cnn-downsampled'))} | "
              f"{PAPER.get(name, '—')} | {memory} | {ms} |")


if __name__ == "__main__":
    main()
