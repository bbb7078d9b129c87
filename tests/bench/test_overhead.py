"""Smoke test of bench/overhead.py --small --vs-all-at-once: every figure line and every JSON field is
there and finite, the figures are the run store's own (timing, exploit latencies, lineage), the
table shows the JSON's figures, and the run with a slot per member trains the same histories.
A real driver on its own local Ray (as the script starts it), real members; never a timing."""
from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys

import pytest

from population.store import RunStore
from tests.helpers import REPO

FIELDS = ["workload", "rounds", "member_compute_s", "wall_s", "slots", "orchestration_efficiency", "member_cpu_s",
          "cpu_utilisation", "exploits", "state_mb", "exploit_latency_median_s", "exploit_latency_max_s",
          "disk_save_load_s", "disk_save_fsync_load_s", "exploit_over_disk", "receiver_read_median_s",
          "receiver_load_median_s", "best_val_bpb", "all_at_once_wall_s", "all_at_once_efficiency",
          "wall_ratio_vs_all_at_once", "same_histories"]
LINES = [r"orchestration efficiency  (\d\.\d{3})  \(Σ compute .* s / \(wall .* s × 2 slots\); goal >= 0\.97\)",
         r"  CPU utilisation  (\d\.\d{3})  \(member CPU seconds .* s / \(wall .* s × 2 CPUs\)\)",
         r"exploit latency \(median\)  (\d+\.\d) ms over (\d+) exploits \(goal <= 10 ms\); disk save\+load of the same "
         r"\d+\.\d\d MB state \d+\.\d ms; ratio \d+\.\d{3}",
         r"  with the save flushed to the device \(fsync\) \d+\.\d ms; ratio \d+\.\d{3}",
         r"  inside the receiver \(medians\): reading from the object store \d+\.\d\d ms, loading \d+\.\d\d ms; "
         r"the rest is the Ray call",
         r"all at once \(4 slots\): wall .* s, efficiency \d\.\d{3}, CPU utilisation \d\.\d{3}; "
         r"wall with 2 slots / all at once = \d+\.\d{3}; same fitness histories: True"]


@pytest.mark.slow
def test_small_setting_prints_every_figure_from_the_run_store(tmp_path):
    storage = tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "overhead.py"), "--small", "--vs-all-at-once",
                           "--storage", str(storage)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(LINES) + 1
    printed = [re.fullmatch(pattern, line) for pattern, line in zip(LINES, lines)]
    assert all(printed), [line for m, line in zip(printed, lines) if not m]
    figures = json.loads(lines[-1])
    assert list(figures) == FIELDS
    assert figures["workload"] == "quickstart, 4 members, interval 2, 6 steps, sync, 2 CPUs, 0.5 CPU/member"
    assert all(math.isfinite(v) and v > 0 for k, v in figures.items() if k not in ("workload", "same_histories"))
    assert figures["rounds"] == 3 and figures["slots"] == 2 and figures["same_histories"] is True

    # the figures are the run store's: the timing of state.json, the exploits' latencies and lineage
    (name,) = [p.name for p in storage.iterdir() if not p.name.endswith("-all")]
    store = RunStore(str(storage), name)
    state = store.read_state()
    timing, latencies = state["timing"], state["exploit_latencies"]
    assert timing["slots"] == 2 and state["round"] == 3
    assert figures["member_compute_s"] == round(timing["member_compute_s"], 2)
    assert figures["wall_s"] == round(timing["wall_s"], 2)
    efficiency = timing["member_compute_s"] / (timing["wall_s"] * 2)   # 2 slots
    cpu_busy = timing["member_cpu_s"] / (timing["wall_s"] * 2)          # 2 CPUs
    assert figures["orchestration_efficiency"] == round(efficiency, 4)
    assert figures["cpu_utilisation"] == round(cpu_busy, 4)
    exploits = [r for r in store.read_lineage() if r["event"] == "exploit"]
    assert len(exploits) == len(latencies) == figures["exploits"] >= 1   # every member judged every round
    assert [r["latency_s"] for r in exploits] == latencies
    assert figures["exploit_latency_median_s"] == round(statistics.median(latencies), 4)
    assert figures["exploit_latency_max_s"] == round(max(latencies), 4)
    for key in ("read_s", "load_s"):
        assert figures[f"receiver_{key[:-2]}_median_s"] == round(statistics.median(r["receiver_s"][key] for r in exploits), 5)
    best = min(m["history"][-1][1] for m in state["members"])   # the best member's fitness now
    assert figures["best_val_bpb"] == round(best, 4)
    # the table shows the run store's figures at 3 decimals (the JSON's, which hold 4, are not rounded
    # again: 0.42050... is 0.4205 in the JSON, 0.421 in the table, and round(0.4205, 3) is 0.42)
    assert printed[0].group(1) == f"{efficiency:.3f}"
    assert printed[1].group(1) == f"{cpu_busy:.3f}"
    assert abs(float(printed[0].group(1)) - figures["orchestration_efficiency"]) <= 0.0005 + 1e-12
    assert abs(float(printed[1].group(1)) - figures["cpu_utilisation"]) <= 0.0005 + 1e-12
    assert int(printed[2].group(2)) == figures["exploits"]
    # the second run: a slot per member, the same members' histories
    other = RunStore(str(storage), f"{name}-all").read_state()
    assert other["timing"]["slots"] == 4
    assert [m["history"] for m in other["members"]] == [m["history"] for m in state["members"]]
