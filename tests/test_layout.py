"""The README's Layout table names the file of every concept, and each name is right: every path
it lists exists, and every module of the four packages (and bench/) is listed, so the table
cannot drift from the tree in either direction."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("evo", "trainers", "population", "experiments")


def _layout_paths() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| concept")]
    return [p for row in rows for p in re.findall(r"`([\w/]+(?:\.py)?/?)`", row.rsplit("|", 2)[-2])]


def test_every_path_in_the_layout_table_exists():
    paths = _layout_paths()
    assert len(paths) >= 30
    missing = [p for p in paths if not (REPO / p).exists()]
    assert missing == []


def test_every_module_is_named_in_the_layout_table():
    named = set(_layout_paths())
    modules = sorted(str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).glob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    assert [m for m in modules if m not in named] == []
    assert "bench/" in named
