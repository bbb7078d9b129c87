"""Smoke test of bench/peer_tune.py --small: Ray Tune's PBT over evo's Trainer runs to the end.

Two trials of 2 intervals x 4 steps on one slot: Tune's PBT pauses each trial after its first
result (the other is waiting) and resumes it from its checkpoint, so both trials restore once;
no exploit can happen (the first result of the first trial has no one to compare with, and the
other trial's first result finds no checkpoint of a top trial to clone), so the trials train
exactly 2 x 8 steps. Behaviour only, never a timing."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tune_pbt_small_trains_every_trial_to_the_end_through_checkpoint_restores():
    # imported as bench/peers.py imports it (not run as __main__): Ray's workers get its code by value
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import peer_tune; "
              "sys.exit(peer_tune.main(['--small']))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["workload"] == {"seed": 0, "size": 2, "total_steps": 8, "interval": 4,
                                  "set": result["workload"]["set"]}
    assert len(result["genomes"]) == 2
    assert math.isfinite(result["best_val_bpb"]) and result["best_val_bpb"] > 0
    curve = result["curve"]
    assert len(curve) == 4                               # 2 trials x 2 reports
    steps = [row[0] for row in curve]
    assert steps == [4, 8, 12, 16]                       # ends at size x total_steps
    best = [row[2] for row in curve]
    assert all(a >= b for a, b in zip(best, best[1:])) and best[-1] == result["best_val_bpb"]
    assert all(0 < row[1] <= result["wall_s"] for row in curve)
    assert result["final_steps"] == [8, 8]               # every trial reached total_steps
    assert result["restores"] == 2 and result["exploits"] == 0
    assert result["steps"] == 16
    assert "best val_bpb" in out.stdout.strip().splitlines()[-2]
