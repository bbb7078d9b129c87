"""Smoke test of bench/peers.py --small: both tables (equal compute, equal wall) are complete and
well formed (never a timing)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LABELS_OF = {"tune_pbt": "Ray Tune PBT", "optuna_tpe_sh": "Optuna TPE + SH"}


def _rows(lines: list[str], title: str, labels: list[str]) -> dict[str, list[float]]:
    """The rows of the table under ``title``: {method label: [seed 0, mean, std, wall s, steps, mean/pbt]}."""
    head = lines.index(title)
    assert lines[head + 1].split() == ["method", "seed", "0", "mean", "std", "wall", "s", "steps", "mean/pbt"]
    rows = {}
    for line in lines[head + 2: head + 2 + len(labels)]:
        m = re.fullmatch(r"(.+?) +(\S+) +(\S+) +(\S+) +(\S+) +(\S+) +(\S+)", line)
        assert m, line
        rows[m.group(1)] = [float(x) for x in m.groups()[1:]]
    assert list(rows) == labels
    assert all(math.isfinite(v) for row in rows.values() for v in row)
    return rows


@pytest.mark.slow
def test_peers_bench_small_writes_a_complete_table(tmp_path, ray_head):
    tune = (ROOT / "bench" / "peer_tune.py").exists()
    # evo's arms join the session's `ray start --head` (RAY_ADDRESS); Tune's arm starts its own local Ray
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--small", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=ray_head.driver_env)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    labels = ["evo pbt", "evo pb2", "evo ga", "evo random", *(["Ray Tune PBT"] if tune else []), "Optuna TPE + SH"]
    assert ("tune arm: bench/peer_tune.py missing" in out.stdout) is not tune
    lines = out.stdout.splitlines()
    rows = _rows(lines, "table A (lr, weight decay), equal compute: 16 optimizer steps per method", labels)
    for seed0, mean, std, wall, steps, ratio in rows.values():
        assert seed0 == mean and std == 0.0 and wall > 0
        assert steps == 16   # equal compute: 2 members x 8 steps for every method
    assert rows["evo pbt"][-1] == 1.0

    figures = json.loads((tmp_path / "peers.json").read_text())
    assert figures["workload"]["size"] == 2 and figures["workload"]["total_steps"] == 8
    arms = figures["tables"]["A"]["arms"]["equal_compute"]
    summary = figures["tables"]["A"]["summary"]["equal_compute"]
    methods = ["pbt", "pb2", "ga", "random", *(["tune_pbt"] if tune else []), "optuna_tpe_sh"]
    assert list(arms) == methods == list(summary)
    for m in methods:
        run = arms[m]["0"]
        curve = run["curve"]
        # best so far: optimizer steps growing to the budget, wall finite, values never rising
        assert [p[0] for p in curve] == sorted(p[0] for p in curve) and curve[-1][0] == run["steps"] == 16
        assert all(math.isfinite(p[1]) and p[1] >= 0 for p in curve)
        assert all(a[2] >= b[2] for a, b in zip(curve, curve[1:]))
        assert curve[-1][2] == run["best_val_bpb"] == summary[m]["mean"]
    # the same Trainer, initial genomes and trainer seeds: every evo strategy's first round (before
    # any exploit) and Optuna's enqueued trials evaluate the same members to the same bits/byte
    first = arms["random"]["0"]["first_evaluations"]
    assert sorted(first) == ["0", "1"] and all(math.isfinite(v) for v in first.values())
    for m in ("pbt", "pb2", "ga", "optuna_tpe_sh"):
        assert arms[m]["0"]["first_evaluations"] == first, m

    # equal wall: evo pbt's run of the equal-compute table, and each peer given its whole-process wall
    # seconds (no step budget); the peers' rows complete, their curves well formed
    peers = [m for m in methods if m in ("tune_pbt", "optuna_tpe_sh")]
    wall_rows = _rows(lines, "table A (lr, weight decay), equal wall time: each peer gets evo pbt's wall seconds",
                      ["evo pbt", *(LABELS_OF[m] for m in peers)])
    assert wall_rows["evo pbt"] == rows["evo pbt"]
    for seed0, mean, std, wall, steps, ratio in wall_rows.values():
        assert seed0 == mean and std == 0.0 and wall > 0 and steps > 0
    wall_arms = figures["tables"]["A"]["arms"]["equal_wall"]
    wall_summary = figures["tables"]["A"]["summary"]["equal_wall"]
    assert list(wall_arms) == ["pbt", *peers] == list(wall_summary)
    assert wall_arms["pbt"]["0"] == arms["pbt"]["0"]
    budget = arms["pbt"]["0"]["wall_s"]
    for m in peers:
        run = wall_arms[m]["0"]
        assert run["wall_budget_s"] == budget and run["wall_s"] > 0
        curve = run["curve"]
        assert curve and [p[0] for p in curve] == sorted(p[0] for p in curve) and curve[-1][0] == run["steps"] > 0
        assert all(math.isfinite(p[1]) and p[1] >= 0 for p in curve)
        assert all(a[2] >= b[2] for a, b in zip(curve, curve[1:]))
        assert math.isfinite(run["best_val_bpb"]) and curve[-1][2] == run["best_val_bpb"] == wall_summary[m]["mean"]
        assert wall_rows[LABELS_OF[m]][0] == round(run["best_val_bpb"], 4)
    margin = [g for g in figures["goals"] if g.startswith("table A: evo pbt's margin over the best peer, equal compute ")]
    assert len(margin) == 1 and margin[0] in lines
    assert re.fullmatch(r".*equal wall [+-]\d+\.\d{4}: (met|not met) \(goal: larger at equal wall\)", margin[0])
    for png in ("peers_steps.png", "peers_wall.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
