"""Smoke test of bench/grace_recovery.py --small (with its --distill-steps path): every change has
its row and its "+ distill" row with a finite jump, "back" and "par" are what the val losses say,
the printed table shows the JSON's figures. Real trainers, real data; never a timing."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

from tests.helpers import REPO

CHANGES = ["layers 3->2", "kv heads 2->1 (merge)"]   # the --small setting's
ROW = re.compile(r" +(\S.*?) +jump ([+-]\d+\.\d{4}) {2}back (\d+|-) {2}par (\d+|-) {2}(\d+\.\d{4}) (\d+\.\d{4})")


def _first(vals: list[float], bound: list[float]) -> int | None:
    """The first interval (1-based) whose val loss is at or below its bound, as the script counts."""
    return next((k + 1 for k, (v, b) in enumerate(zip(vals, bound)) if v <= b), None)


def test_small_setting_prints_every_change_plain_and_distilled(tmp_path):
    out = tmp_path / "grace.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "grace_recovery.py"), "--small", "--distill-steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("seed 0: val loss ") and len(lines) == 11

    data = json.loads(out.read_text())
    assert data["workload"]["small"] is True and data["workload"]["changes"] == CHANGES
    assert data["workload"]["seeds"] == 1 and data["workload"]["distill_steps"] == 2
    (run,) = data["runs"]
    before, ref = run["before"], run["unchanged"]
    assert math.isfinite(before) and len(ref) == 2 and all(math.isfinite(v) for v in ref)
    rows = run["changes"]
    assert [(r["change"], r["distilled"]) for r in rows] == [(c, d) for c in CHANGES for d in (False, True)]
    for r in rows:
        assert math.isfinite(r["jump"]) and len(r["val_loss"]) == 2 and all(math.isfinite(v) for v in r["val_loss"])
        # back: the jump won back (at or below the loss before the change); par: at or below the unchanged model's
        assert r["back"] == _first(r["val_loss"], [before] * 2)
        assert r["par"] == _first(r["val_loss"], ref)
        assert r["jump"] > 0   # both changes are lossy (seeded run): the copy starts above the model before it
    plain, distilled = rows[0::2], rows[1::2]
    for p, d in zip(plain, distilled):
        assert d["jump"] == p["jump"]                      # the same change of the same state, before any step
        assert d["val_loss"][0] != p["val_loss"][0]        # the KL term changed the steps after it

    # the printed rows are the JSON's, rounded: every change, then its "+ distill" line
    printed = [ROW.fullmatch(line) for line in lines[1:5]]
    assert all(printed), lines[1:5]
    assert [m.group(1) for m in printed] == [CHANGES[0], "+ distill", CHANGES[1], "+ distill"]
    for m, r in zip(printed, rows):
        assert float(m.group(2)) == round(r["jump"], 4)
        assert m.group(3) == str(r["back"] or "-") and m.group(4) == str(r["par"] or "-")
        assert [float(m.group(5)), float(m.group(6))] == [round(v, 4) for v in r["val_loss"]]
    # the back table (one seed: the median is the seed's) and the plain / distilled table
    assert lines[5] == "intervals to win back the jump (per seed; '-': not within the run):"
    for line, change, p in zip(lines[6:8], CHANGES, plain):
        assert line == f"  {change:30s} {p['back'] or '-'}" + (f"  median {p['back']:g}" if p["back"] else "")
        assert data["back_median"][change] == p["back"]
    assert lines[8].startswith("val loss after each interval, mean over seeds: plain / distilled (distill_steps 2")
    assert list(data["distill"]) == CHANGES
    for change, p, d in zip(CHANGES, plain, distilled):
        assert data["distill"][change] == {"plain": p["val_loss"], "distilled": d["val_loss"]}
    for line, change, p, d in zip(lines[9:], CHANGES, plain, distilled):
        assert line == f"  {change:30s} " + "  ".join(f"{a:.4f}/{b:.4f}/{b - a:+.4f}"
                                                     for a, b in zip(p["val_loss"], d["val_loss"]))
