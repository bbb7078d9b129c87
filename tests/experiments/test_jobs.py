"""`ray job submit` against a real `ray start --head` on loopback, with token authentication on."""
from __future__ import annotations

import re
import time

import pytest

from tests.helpers import QUICKSTART, REPO, TINY, evo_status, read_lineage, set_args

pytestmark = pytest.mark.slow


@pytest.fixture
def head(ray_head):
    """The session's `ray start --head` (tests/conftest.py), shared with the other modules whose runs
    join a cluster."""
    return ray_head


def _submission_id(text: str) -> str:
    m = re.search(r"(raysubmit_[A-Za-z0-9]+)", text)
    assert m, text
    return m.group(1)


def test_unauthenticated_client_is_refused(head):
    import subprocess

    from tests.helpers import RAY

    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    r = subprocess.run([RAY, "job", "list", "--address", head.address], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "token" in (r.stdout + r.stderr).lower()


def test_job_stopped_then_resubmitted_resumes_and_runs_to_completion(head, tmp_path):
    """A job stopped mid-run, then the same job submitted again: it resumes from the committed round
    and runs to completion as a job (the job succeeds; the run is finished with every file). One
    run serves both: a job that only runs to completion is the resubmitted job's second half."""
    storage = tmp_path / "runs"
    # 30 short rounds: a window of some seconds to stop the job in, then the rest after the resubmit
    overrides = TINY + ["population.total_steps=300", "population.interval_steps=10"]
    cmd = ["--working-dir", str(REPO), "--", "evo", "run", QUICKSTART,
           "--storage", str(storage), "--name", "job2", *set_args(overrides)]
    r = head.job("submit", "--no-wait", *cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    sid = _submission_id(r.stdout + r.stderr)

    # Stop it once a few rounds are committed, well before the end (30 rounds).
    deadline = time.time() + 240
    status = None
    while time.time() < deadline:
        status = evo_status(storage, "job2", head.env)
        if status and status["round"] >= 3:
            break
        time.sleep(0.5)
    assert status and status["round"] >= 3, "job never committed 3 rounds"
    r = head.job("stop", sid)
    assert r.returncode == 0, r.stdout + r.stderr
    for _ in range(60):
        if "stopped" in head.job("status", sid).stdout.lower():
            break
        time.sleep(1)
    assert "stopped" in head.job("status", sid).stdout.lower()
    stopped = evo_status(storage, "job2", head.env)
    assert stopped["status"] in ("stopped", "interrupted")
    assert 3 <= stopped["round"] < 30
    stopped_round = stopped["round"]

    r = head.job("submit", *cmd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resuming from round {stopped_round}" in (r.stdout + r.stderr).lower()
    assert "succeeded" in head.job("status", _submission_id(r.stdout + r.stderr)).stdout.lower()
    final = evo_status(storage, "job2", head.env)
    assert final["status"] == "finished" and final["round"] == 30   # 300 steps / interval 10
    assert sorted(m["id"] for m in final["members"]) == [0, 1]
    assert all(m["alive"] and m["step"] == 300 for m in final["members"])
    run_dir = storage / "job2"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "state.json").is_file()
    lineage = read_lineage(run_dir)
    assert any(rec["event"] == "born" for rec in lineage)
    rounds = [rec["round"] for rec in lineage if rec["event"] != "born"]
    # Lineage continues without a gap or a repeated round across the stop.
    assert rounds == sorted(rounds)
