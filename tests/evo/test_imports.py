"""`evo` is the algorithm half: importing any of it must not pull in torch or ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import importlib, json, pkgutil, sys
import evo
names = ["evo"] + sorted(m.name for m in pkgutil.walk_packages(evo.__path__, "evo."))
for name in names:
    importlib.import_module(name)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray"})
print(json.dumps({"imported": names, "heavy": heavy}))
"""


def test_no_evo_module_imports_torch_or_ray():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"evo.space", "evo.genome", "evo.selection", "evo.crossover", "evo.mutation"} <= set(result["imported"])
    assert result["heavy"] == []


def test_the_model_rules_import_no_torch():
    # tests/evo and experiments/ hand trainers.architecture's rules to the space: pure Python
    check = "import sys, trainers.architecture; print(sorted({'torch', 'ray', 'evo'} & set(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", check], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
