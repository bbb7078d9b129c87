"""A driver killed with SIGKILL mid-run, then the same command again: the run finishes with every
round, and in sync mode on CPU its fitness table and lineage equal an uninterrupted run's."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.helpers import EVO, QUICKSTART, TINY, comparable_lineage, evo_env, evo_status, read_lineage, set_args

pytestmark = pytest.mark.slow

OVERRIDES = TINY + ["population.size=3", "population.total_steps=120", "population.interval_steps=10"]
ROUNDS = 12


def _run(storage, name, env, **kw):
    return [EVO, "run", QUICKSTART, "--storage", str(storage), "--name", name, *set_args(OVERRIDES)]


def _fitness_table(status: dict) -> list[tuple]:
    return sorted((m["id"], m["step"], m["val_bpb"], str(m["genome"]), m["parent"]) for m in status["members"])


def test_sigkill_then_same_command_equals_uninterrupted(tmp_path):
    env = evo_env(tmp_path / "cache")
    storage = tmp_path / "runs"

    # The uninterrupted reference run.
    ref = subprocess.run(_run(storage, "ref", env), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    # The same search, killed with SIGKILL once a few rounds are committed.
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(_run(storage, "killed", env), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        st = evo_status(storage, "killed", env)
        if st and st["round"] >= 4:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = st["round"]
            break
        time.sleep(0.2)
    proc.wait(timeout=60)
    # Whatever the driver had started (its local Ray) goes with it; clean up stragglers in its session.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log.close()
    assert killed_at is not None, (tmp_path / "killed.log").read_text()[-3000:]
    mid = evo_status(storage, "killed", env)
    assert mid["round"] < ROUNDS and mid["status"] in ("running", "interrupted")

    again = subprocess.run(_run(storage, "killed", env), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    ref_status = evo_status(storage, "ref", env)
    resumed = evo_status(storage, "killed", env)
    assert resumed["status"] == ref_status["status"] == "finished"
    assert resumed["round"] == ref_status["round"] == ROUNDS
    assert _fitness_table(resumed) == _fitness_table(ref_status)
    assert comparable_lineage(read_lineage(storage / "killed")) == comparable_lineage(read_lineage(storage / "ref"))
