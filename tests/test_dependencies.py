"""Every third-party module the shipped code imports is installed by `pip install -e .` — the
README's main job runs without the test extras, so a library only in `[test]` breaks it."""
from __future__ import annotations

import ast
import configparser
import re
import sys

from tests.helpers import REPO

PACKAGES = ("evo", "trainers", "population", "experiments")
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml"}


def _imported_modules() -> dict[str, str]:
    found: dict[str, str] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def _install_requires() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].split("\n")
    return {re.split(r"[\[<>=!~ ]", line.strip(), maxsplit=1)[0].lower() for line in lines if line.strip()}


def test_runtime_imports_are_install_requires():
    required = _install_requires()
    missing = {
        module: where
        for module, where in _imported_modules().items()
        if module not in sys.stdlib_module_names and module not in PACKAGES
        and DISTRIBUTION.get(module, module).lower() not in required
    }
    assert not missing, f"imported by shipped code but not in install_requires: {missing}"
