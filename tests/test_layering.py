"""Imports flow one way (experiments -> population -> {evo, trainers}): loading a config needs no
ray, trainers/ needs neither ray nor evo. Each check runs in a fresh interpreter in which the
forbidden packages cannot be imported at all (a None entry in sys.modules makes `import` fail),
so a hidden import fails here rather than merely being noticed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, blocked: tuple[str, ...]) -> dict:
    prelude = "import sys\n" + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", prelude + code], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_config_loads_and_builds_without_ray():
    result = _run(
        "import json\n"
        "from experiments.config import build_setup, load_config\n"
        "setup = build_setup(load_config('experiments/quickstart.yaml', ['population.size=6']))\n"
        "print(json.dumps({'size': setup.population.size, 'genes': len(setup.space),\n"
        "                  'driver': 'population.driver' in sys.modules}))\n",
        blocked=("ray",))
    assert result == {"size": 6, "genes": 3, "driver": False}


def test_every_trainers_module_imports_without_ray_or_evo():
    result = _run(
        "import importlib, json, pkgutil, trainers\n"
        "names = sorted(m.name for m in pkgutil.iter_modules(trainers.__path__, 'trainers.'))\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(names))\n",
        blocked=("ray", "evo"))
    assert {"trainers.model", "trainers.cpu_fused", "trainers.trainer", "trainers.architecture"} <= set(result)
