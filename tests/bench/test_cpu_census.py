"""Smoke test of bench/cpu_census.py --small: the table is complete and well formed (never a timing)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOTALS = ["evo: all processes", "evo: not members training", "plain pool: all processes",
          "share of evo CPU not training", "evo CPU / plain pool CPU", "evo training CPU / plain pool CPU",
          "evo wall / plain pool wall"]
TRAINING = "training (train_part, train_and_evaluate calls)"
IN_CALLS = "(timing.member_cpu_s: CPU during train calls)"


@pytest.mark.slow
def test_cpu_census_small_prints_a_complete_table():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_census.py"), "--small"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("workload: quickstart, 2 members x 4 steps, interval 2, sync; plain pool: 2 processes")
    assert re.fullmatch(r"load \(1 min\): [\d.]+ before, [\d.]+ between evo and the pool, [\d.]+ after", lines[1])
    assert lines[2].split() == ["process", "kind", "procs", "CPU", "s"]
    figures = json.loads(lines[-1])
    evo = figures["evo"]
    rows: dict[str, tuple[int, float]] = {}
    groups: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    kind = None
    for line in lines[3:-1]:
        if line.startswith("  "):   # a thread group of the kind above
            m = re.fullmatch(r"  (\S.*?) +(\d+\.\d+)", line)
            assert m and kind in ("driver", "member"), line
            groups[kind][m.group(1)] = float(m.group(2))
        elif m := re.fullmatch(r"(\S.*?) +(\d+) +(\d+\.\d+)", line):
            kind = m.group(1)
            rows[kind] = (int(m.group(2)), float(m.group(3)))
            groups[kind] = {}
        else:
            m = re.fullmatch(r"(\S.*?) +(-?\d+\.\d+)", line)
            assert m, line
            totals[m.group(1)] = float(m.group(2))
    # every process kind of the JSON is a row, with its count and CPU; the driver, the members
    # (one per member), Ray's GCS and raylet are always there, and no log monitor
    assert {k: (v["processes"], pytest.approx(v["cpu_s"], abs=0.01)) for k, v in evo["kinds"].items()} == rows
    assert rows["driver"][0] == 1 and rows["member"][0] == 2 and rows["GCS"][0] == 1 and rows["raylet"][0] == 1
    assert "log monitor" not in rows
    assert all(cpu >= 0 for _, cpu in rows.values()) and rows["member"][1] > 0 and rows["driver"][1] > 0
    assert list(totals) == TOTALS and all(math.isfinite(v) for v in totals.values())
    # the members' threads: their main thread and training are there, and the groups add up to
    # the members' CPU; the driver's likewise
    member = {g: v for g, v in groups["member"].items() if g != IN_CALLS}
    assert member == pytest.approx(evo["member_threads"], abs=0.01)
    assert member["main thread"] > 0 and member[TRAINING] > 0 and member[TRAINING] == evo["members_training_s"]
    assert sum(member.values()) == pytest.approx(rows["member"][1], abs=0.05)
    assert groups["member"][IN_CALLS] == pytest.approx(evo["member_cpu_in_calls_s"], abs=0.01)
    assert evo["member_cpu_in_calls_s"] > 0
    assert groups["driver"] == pytest.approx(evo["driver_threads"], abs=0.01) and "main thread" in groups["driver"]
    assert sum(groups["driver"].values()) == pytest.approx(rows["driver"][1], abs=0.05)
    assert figures["evo_cpu_s"] == pytest.approx(sum(v["cpu_s"] for v in evo["kinds"].values()))
    assert figures["not_training_share"] == pytest.approx(
        (figures["evo_cpu_s"] - evo["members_training_s"]) / figures["evo_cpu_s"])
    assert figures["pool"]["cpu_s"] > 0
    assert figures["evo_over_pool_cpu"] == pytest.approx(figures["evo_cpu_s"] / figures["pool"]["cpu_s"])
    # the pool trains the same members (genomes, seeds, steps, evaluations) with the same Trainer
    assert evo["best_val_bpb"] == figures["pool"]["best_val_bpb"]


@pytest.mark.parametrize("flag", ["--period", "--thread-period"])
def test_cpu_census_refuses_a_bad_period_before_starting_anything(flag):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_census.py"), flag, "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert f"{flag}: must be > 0, got 0.0" in out.stderr
    assert out.stdout == ""
