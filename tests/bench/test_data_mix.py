"""bench/data_mix.py --small: the table is complete and well formed, the plot and JSON are written,
and the evolved arm's mix schedule starts at step 0 with docs shares in [0, 1]. A smoke test of the
benchmark's code paths (real `evo run`s, 20 steps); it never looks at how long anything took."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO

pytestmark = pytest.mark.slow

ARMS = ["evolved", "0", "100"]


def test_small_setting_prints_every_arm_and_writes_the_plot(tmp_path, ray_head):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "data_mix.py"), "--small", "--out", str(out),
                           "--storage", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=ray_head.driver_env)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arm "))
    assert lines[header].split() == ["arm", "seed0", "mean", "std", "evolved/arm"]
    rows = lines[header + 1:header + 1 + len(ARMS)]
    assert [r.split()[0] for r in rows] == ["evolved", "fixed", "fixed"]
    assert [r.split()[1] for r in rows[1:]] == ["0%", "100%"]
    for r in rows:
        bpb, mean, std, ratio = map(float, r.split()[-4:])
        assert math.isfinite(bpb) and bpb > 0 and mean == bpb and std == 0.0 and ratio > 0
    assert lines[header + 1 + len(ARMS)].startswith("best fixed: ")
    data = json.loads((out / "data_mix.json").read_text())
    assert data["arms"] == ARMS and data["seeds"] == [0] and data["total_steps"] == 20
    assert sorted(r["arm"] for r in data["rows"]) == sorted(ARMS)
    evolved = next(r for r in data["rows"] if r["arm"] == "evolved")
    # the schedule is read from the lineage: it starts at the birth and stays a share
    assert evolved["schedule"][0][0] == 0 and all(0 <= share <= 1 for _, share in evolved["schedule"])
    assert all(r["schedule"] is None for r in data["rows"] if r["arm"] != "evolved")
    # each fixed arm trained on its fixed mix: its stored config says so
    for arm, docs in (("0", 0.0), ("100", 1.0)):
        cfg = yaml.safe_load((tmp_path / "runs" / f"fixed{arm}-s0" / "config.yaml").read_text())
        assert list(cfg["search"]) == ["train.lr"] and cfg["data"]["mix"] == {"code": 1.0 - docs, "docs": docs}
    png = out / "data_mix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
