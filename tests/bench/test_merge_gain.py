"""Smoke test of bench/merge_gain.py --small: every alpha's row for every trial, finite values, the
counts integers within 0..merges and equal to what the rows say, the printed table showing the
JSON's figures; and a real property of the merge: at alpha 1 the child is parent 1 and at alpha 0
parent 2 (their val bpb exactly). Real trainers, real data; never a timing."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.helpers import REPO

ALPHAS = ["uniform", "fitness", "0.5", "0", "1"]   # the default three, then the two ends
VALUES = ["p1_bpb", "p2_bpb", "merged", "p1_next", "p2_next", "m_next"]


def test_small_setting_prints_every_alpha_and_a_merge_at_an_end_is_that_parent(tmp_path):
    out = tmp_path / "merge.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "merge_gain.py"), "--small", "--alphas", *ALPHAS,
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["seed", "trial", "alpha", "value", *VALUES]

    data = json.loads(out.read_text())
    assert data["workload"]["small"] is True and data["workload"]["alphas"] == ALPHAS
    trials = data["merges"]
    assert trials == data["workload"]["seeds"] * data["workload"]["trials"] == 2
    rows = data["rows"]
    assert [(r["seed"], r["trial"], r["alpha"]) for r in rows] == [(0, t, a) for t in range(2) for a in ALPHAS]
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in VALUES)
        assert 0.0 <= r["value"] <= 1.0
    for t in range(2):
        by = {r["alpha"]: r for r in rows if r["trial"] == t}
        # the same two parents for every alpha of a trial
        assert len({tuple(r[k] for k in ("p1_bpb", "p2_bpb", "p1_next", "p2_next")) for r in by.values()}) == 1
        assert by["0.5"]["value"] == 0.5 and by["0"]["value"] == 0.0 and by["1"]["value"] == 1.0
        p1, p2 = by["1"]["p1_bpb"], by["1"]["p2_bpb"]
        assert by["fitness"]["value"] == 1.0 / (1.0 + 2.0 ** (p1 - p2))
        # a merge at an end of [0, 1] is that parent, weights and all: the same val bpb, exactly
        assert by["1"]["merged"] == p1 and by["0"]["merged"] == p2
    # the counts: integers in 0..merges, the rows' own "below both parents"
    beats = data["beats_both"]
    assert list(beats) == ALPHAS
    for a in ALPHAS:
        mine = [r for r in rows if r["alpha"] == a]
        at_once = sum(r["merged"] < min(r["p1_bpb"], r["p2_bpb"]) for r in mine)
        after = sum(r["m_next"] < min(r["p1_next"], r["p2_next"]) for r in mine)
        assert beats[a] == {"at_once": at_once, "after_interval": after}
        assert all(isinstance(v, int) and 0 <= v <= trials for v in beats[a].values())
    assert beats["0"]["at_once"] == beats["1"]["at_once"] == 0   # a parent never beats itself

    # the printed rows are the JSON's, rounded, and the last line the counts
    assert len(lines) == 1 + len(rows) + 1
    for line, r in zip(lines[1:-1], rows):
        assert line.split() == [str(r["seed"]), str(r["trial"]), r["alpha"], f"{r['value']:.3f}",
                                *(f"{r[k]:.4f}" for k in VALUES)]
    assert lines[-1] == ("merged child beats both parents (val_bpb), of 2 merges: " + "; ".join(
        f"alpha {a}: {beats[a]['at_once']} at once, {beats[a]['after_interval']} after one more interval"
        for a in ALPHAS))


def test_an_alpha_outside_zero_one_is_refused_before_training():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "merge_gain.py"), "--small", "--alphas", "uniform", "1.5"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "argument --alphas: '1.5' is not in [0, 1]" in proc.stderr
    assert proc.stdout == ""
