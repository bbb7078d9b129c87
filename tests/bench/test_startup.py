"""Smoke test of bench/startup.py --small: the table is complete and well formed (never a timing)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    "ray.init alone: launch to ready", "of which the ray.init call", "evo: launch to the first round",
    "over ray.init alone (launch to ready)", "evo: round loop", "evo: after the last round to exit",
    "evo: whole process", "plain pool before: whole process", "plain pool after: whole process",
    "plain pool: launch to the first task", "plain pool: first task to last done",
]


@pytest.mark.slow
def test_startup_bench_small_prints_a_complete_table():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "startup.py"), "--small"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("workload: quickstart, 2 members x 4 steps, interval 2, sync; plain pool: 2 processes")
    table = {}
    for line in lines[1:-1]:
        m = re.fullmatch(r"(.+?) +(-?\d+\.\d+)( s)?", line.strip())
        assert m, line
        table[m.group(1)] = float(m.group(2))
    assert list(table) == ROWS + ["whole process / plain pool (mean)", "round loop / pool training (mean)"]
    assert all(math.isfinite(v) for v in table.values())
    figures = json.loads(lines[-1])
    evo, before, after = figures["evo"], figures["pool_before"], figures["pool_after"]
    for part in (evo, before, after, figures["ray_alone"]):
        assert all(v > 0 for k, v in part.items() if k not in ("best_val_bpb", "dashboard"))
    assert figures["ray_alone"]["dashboard"] is True   # the bare ray.init starts Ray as evo's did: with it
    # the parts of evo's wall add up to it, and the table shows the JSON's figures
    assert evo["startup_s"] + evo["loop_s"] + evo["tail_s"] == pytest.approx(evo["whole_s"])
    assert table["evo: whole process"] == pytest.approx(evo["whole_s"], abs=0.01)
    assert figures["whole_over_pool"] == pytest.approx(evo["whole_s"] / ((before["whole_s"] + after["whole_s"]) / 2))
    assert figures["loop_over_pool_training"] == pytest.approx(evo["loop_s"] / ((before["train_s"] + after["train_s"]) / 2))
    assert before["train_s"] < before["whole_s"] and after["train_s"] < after["whole_s"]
    # the pool trains the same members (genomes, seeds, steps, evaluations) with the same Trainer
    assert evo["best_val_bpb"] == before["best_val_bpb"] == after["best_val_bpb"]


def test_startup_bench_refuses_an_unknown_mode_before_starting_anything():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "startup.py"), "--modes", "sync,fast"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert "--modes: 'fast' is not a mode (sync, async)" in out.stderr
    assert out.stdout == ""


def test_the_bare_ray_init_takes_the_dashboard_setting_of_the_evo_run():
    """bench/startup.py compares evo's start-up with a bare ray.init of the same Ray: with Ray's
    dashboard unless the --set overrides turn logging.ray_dashboard off (the last one wins)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from startup import dashboard_of
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert dashboard_of([]) is True
    assert dashboard_of(["population.size=4", "logging.ray_dashboard=false"]) is False
    assert dashboard_of(["logging.ray_dashboard=false", "logging.ray_dashboard=true"]) is True
    assert dashboard_of(["logging.ray_dashboard = no"]) is False
