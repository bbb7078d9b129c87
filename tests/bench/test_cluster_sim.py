"""bench/cluster_sim.py --small: a real ``evo run`` of 8 sleep members on a simulated 2-node Ray
cluster (ray.cluster_utils, token auth on, joined through RAY_ADDRESS=127.0.0.1:port); the table
is complete and well formed and the members ran on both nodes. It never looks at how long
anything took."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO

ROWS = ("setting", "members per node", "nodes used", "a client without the token", "orchestration efficiency (timing.efficiency)", "slots",
        "round loop wall s (timing.wall_s)", "ideal s (rounds x interval x step_s)", "loop wall / ideal",
        "evo run launch to exit s", "cluster start s", "member process PSS MB (median / max)")
EXPLOIT_ROWS = ("all", "same node", "across nodes", "across / same (median)")


@pytest.mark.slow
def test_small_setting_runs_members_on_both_nodes_and_prints_every_row(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "cluster_sim.py"), "--small", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    cells = {}
    for line in proc.stdout.splitlines():
        if line.startswith("| ") and not line.startswith(("| figure", "| exploits")):
            parts = [p.strip() for p in line.strip("|").split("|")]
            cells[parts[0]] = parts[1:]
    assert set(cells) == set(ROWS) | set(EXPLOIT_ROWS)

    r = json.loads((tmp_path / "cluster_sim.json").read_text())
    assert r["status"] == "finished" and r["rounds_done"] == 2
    assert r["setting"] == {"nodes": 2, "cpus_per_node": 2, "members": 8, "rounds": 2, "interval": 5,
                            "step_s": 0.05, "state_kb": 64, "strategy": "pbt"}
    # every member has a node, the population is spread over both
    assert sorted(r["member_node"]) == [str(m) for m in range(8)]
    assert set(r["member_node"].values()) == {"head", "worker1"}
    assert r["members_per_node"] == {n: list(r["member_node"].values()).count(n) for n in ("head", "worker1")}
    assert r["nodes_used"] == 2 and cells["nodes used"] == ["2 of 2"]
    assert r["auth"] == "refused" and cells["a client without the token"] == ["refused"]   # token auth is on
    assert r["slots"] == 8   # population.max_concurrent = members: every member sleeps at once
    for key in ("efficiency", "loop_wall_s", "launch_to_exit_s", "cluster_start_s", "loop_over_ideal"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["ideal_s"] == pytest.approx(2 * 5 * 0.05)
    assert r["loop_over_ideal"] == pytest.approx(r["loop_wall_s"] / r["ideal_s"])
    assert r["member_pss_mb"]["count"] == 8 and r["member_pss_mb"]["median"] > 0

    # exploits: the lineage's, each with both nodes; same + across = all = the summary's count
    ex, records = r["exploits"], r["exploit_records"]
    assert ex["all"]["count"] == len(records) == r["summary_exploit_latency_s"]["count"] >= 1
    assert ex["same_node"]["count"] + ex["across_nodes"]["count"] == ex["all"]["count"]
    for e in records:
        assert e["receiver_node"] == r["member_node"][str(e["receiver"])]
        assert e["donor_node"] == r["member_node"][str(e["donor"])]
        assert e["across"] == (e["receiver_node"] != e["donor_node"]) and e["latency_s"] > 0
    assert ex["all"]["median_s"] == pytest.approx(r["summary_exploit_latency_s"]["median"])
    assert int(cells["all"][0]) == ex["all"]["count"]
    for row, key in (("same node", "same_node"), ("across nodes", "across_nodes")):
        count, median, worst = cells[row]
        assert int(count) == ex[key]["count"]
        if ex[key]["count"]:
            assert float(worst) >= float(median) > 0
        else:
            assert (median, worst) == ("-", "-")
