"""The documents say what is true: README's Python runs, docs/design.md's layout names every
module of the package, docs/cli.md every flag of every command."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_readme_python_runs(run, tmp_path, monkeypatch):
    from zoomnet.data.generators.slides import write_gigapixel

    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 3
    shutil.copytree(run, tmp_path / "run")  # the session's trained run, as "run"
    write_gigapixel(tmp_path / "slide.tif", size=600, seed=0, progress=False, lesions=1)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "slide-heatmap.png").stat().st_size > 0


def test_the_layout_names_every_module():
    """One line per module (a folder's line may name its modules together)."""
    design = (ROOT / "docs/design.md").read_text()
    layout = design[design.index("## Layout"):]
    block = layout[layout.index("```"):layout.index("```", layout.index("```") + 3)]
    missing = []
    for path in sorted((ROOT / "zoomnet").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        folder = rel.rsplit("/", 1)[0] + "/"
        if path.name in ("__init__.py", "__main__.py"):
            continue
        named = rel in block or (folder in block and path.stem in block)
        if not named:
            missing.append(rel)
    assert not missing, f"docs/design.md, Layout: no line for {missing}"


def test_cli_md_names_every_command_and_flag():
    from zoomnet.cli import build_parser

    cli = (ROOT / "docs/cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command, parser in sub.choices.items():
        if f"zoomnet {command}" not in cli:
            missing.append(command)
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help") and flag not in cli:
                    missing.append(f"{command} {flag}")
    assert not missing, f"docs/cli.md does not name {missing}"
