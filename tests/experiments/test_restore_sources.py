"""Where a dead member's state comes from when the object store has none: a run resumed by a new
driver has no state in Ray's object store until every member has published once, so a member
killed in its first ``publish`` comes back from its last checkpoint; with that checkpoint gone
too it is re-cloned from a donor, and the lineage says which."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (EVO, QUICKSTART, TINY, evo_env, evo_status, member_processes, proc_title,
                           read_lineage, set_args)

pytestmark = pytest.mark.slow

STEPS = 40   # TINY: 2 members, interval 10, 4 rounds


def _kill_in_first_publish(cmd: list[str], env: dict, mark: str, member_dir: Path | None) -> tuple[int, str, bool]:
    """Run ``cmd`` (a resume), SIGKILL one member while it runs its first ``publish`` (stopped
    first, then checked still inside it: its result not sent), after removing every checkpoint
    file under ``member_dir`` if given (the other member's state stays in the object store); returns (exit code, output)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed, deadline, pids = None, time.time() + 300, []
    while killed is None and time.time() < deadline and proc.poll() is None:
        if len(pids) < 2:   # the new driver's members, found once: then only their titles are read
            pids = sorted(member_processes(mark))
            time.sleep(0.01)
            continue
        for pid in pids:
            if ".publish" in proc_title(pid):
                os.kill(pid, signal.SIGSTOP)
                if ".publish" in proc_title(pid):
                    if member_dir is not None:
                        for f in member_dir.rglob("*"):
                            if f.is_file():
                                f.unlink()
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                    break
                os.kill(pid, signal.SIGCONT)
        else:
            time.sleep(0.002)
    out, _ = proc.communicate(timeout=600)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.returncode, out, killed is not None


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict]:
    """The finished run both cases resume (made once for the module; each case resumes a copy):
    (its run directory, the environment with its token cache)."""
    root = tmp_path_factory.mktemp("restore_sources")
    env = evo_env(root / "cache")
    storage = root / "runs"
    first = subprocess.run([EVO, "run", QUICKSTART, "--storage", str(storage), "--name", "run", *set_args(TINY)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return storage / "run", env


@pytest.mark.parametrize("source", ["checkpoint", "donor"])
def test_member_killed_after_a_resume_comes_back_from_its_checkpoint_else_a_donor(first_run, tmp_path, source):
    run_dir, env = first_run
    storage, name = tmp_path / "runs", "run"
    shutil.copytree(run_dir, storage / name)   # the run store is a directory: a copy is the same run
    before = evo_status(storage, name, env)
    assert before["status"] == "finished" and before["round"] == STEPS // 10

    mark = f"EVO_TEST_RESTORE={source}-{os.getpid()}"
    env = dict(env, EVO_TEST_RESTORE=mark.split("=", 1)[1])
    at = STEPS
    for _ in range(4):   # a publish of a tiny state is short: a resume that missed it is resumed again
        before = evo_status(storage, name, env)
        more = at + 20
        rc, out, caught = _kill_in_first_publish(
            [EVO, "resume", name, "--storage", str(storage), "--set", f"population.total_steps={more}"], env, mark,
            None if source == "checkpoint" else storage / name / "checkpoints")
        assert rc == 0, out[-3000:]
        # a kill that came just after the publish's state reached the object store (the title
        # still read publish) is restored from there: not the case under test, resume again
        late = caught and any(r["event"] == "restored" and r.get("source") == "object store"
                              for r in read_lineage(storage / name) if r["round"] >= before["round"])
        if caught and not late:
            break
        caught = False
        at = more
    assert caught, out[-3000:]

    after = evo_status(storage, name, env)
    assert after["status"] == "finished" and [m["step"] for m in after["members"]] == [more, more]
    new = [r for r in read_lineage(storage / name)
           if r["round"] >= before["round"] and r["event"] in ("restored", "died", "restart")]
    if source == "checkpoint":
        assert len(new) == 1, new
        (r,) = new
        assert r["event"] == "restored" and r["source"] == "checkpoint", r
        assert r["step"] == at and r["round"] == before["round"] and "process died" in r["error"], r
        assert after["failures"] == 0
    else:
        events = [r["event"] for r in new]
        assert events[:2] == ["died", "restart"], new
        died, restart = new[:2]
        assert "its state was lost" in died["error"] and died["member"] == restart["member"], new
        assert restart["parents"] and restart["parents"][0] != restart["member"], restart
        assert restart["step"] == at, restart
        assert after["failures"] == 0   # the platform's fault: not counted
