"""Imports flow one way (experiments -> population -> {evo, trainers}): loading a config needs no
ray (and no torch), trainers/ needs neither ray nor evo, the driver needs no torch. Each check runs in a fresh interpreter in which the
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


def test_configs_load_and_the_driver_imports_without_torch():
    # torch is the members' (a CPU second and more to import): loading and validating a config, and
    # importing the driver that starts Ray and the members, import none of it, so a bad config
    # is refused and Ray starts without it. A config whose fitness.function is a user's metric is
    # left out: checking it imports the user's module, which may import torch.
    result = _run(
        "import glob, json, yaml\n"
        "from experiments.config import build_setup, load_config\n"
        "loaded = []\n"
        "for path in sorted(glob.glob('experiments/*.yaml')):\n"
        "    if (yaml.safe_load(open(path)).get('fitness') or {}).get('function') is None:\n"
        "        build_setup(load_config(path))\n"
        "        loaded.append(path)\n"
        "import experiments.cli, population.driver, population.replay\n"
        "print(json.dumps({'loaded': loaded, 'driver': 'population.driver' in sys.modules,\n"
        "                  'torch': sorted(m for m in sys.modules if m.split('.')[0] == 'torch')}))\n",
        blocked=())
    assert "experiments/quickstart.yaml" in result["loaded"] and len(result["loaded"]) >= 6
    assert result["driver"] and result["torch"] == []
