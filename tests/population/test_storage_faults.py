"""Storage faults under a real ``evo run`` (joined to a real `ray start --head`, real files): a
damaged checkpoint or state file is found by its checksum and the run resumes from the commit
before it, with one warning line; with no intact commit, and when a write fails, the run stops
with one line and the last commit stays as it was."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from population.store import RunStore

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "population.size=2", "population.interval_steps=10",
    "data.seq_len=32", "data.max_bytes=200000", "data.eval_batches=2", "data.eval_batch_size=4",
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
    "train.batch_size=4", "train.warmup_steps=2", "logging.wandb.mode=disabled", "logging.optuna=false",
    "search={train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}}",
]


def evo_run(storage: Path, total_steps: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    sets = [a for o in [*TINY, f"population.total_steps={total_steps}"] for a in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "experiments", "run", str(REPO / "experiments" / "quickstart.yaml"),
         "--name", "run", "--storage", str(storage), *sets],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def lines(out: subprocess.CompletedProcess) -> list[str]:
    """stderr without Ray's own banner line."""
    return [ln for ln in out.stderr.splitlines() if "Token authentication is enabled" not in ln]


def state(run: Path) -> dict:
    return RunStore(run.parent, run.name).read_state()


def resign(run: Path, edit) -> None:
    """``edit`` every state body in place (whole or a delta), each written again with its new
    checksum wherever it is named: in state.json and in the delta written after it."""
    pointer = json.loads((run / "state.json").read_text())
    new_sha = {}
    for path in sorted((run / "states").glob("*.json")):
        rel = f"states/{path.name}"
        body = json.loads(path.read_text())
        edit(body)
        of = (body.get("delta") or {}).get("of")
        if of and of["file"] in new_sha:
            of["sha256"] = new_sha[of["file"]]
        data = json.dumps(body).encode()
        path.write_bytes(data)
        new_sha[rel] = hashlib.sha256(data).hexdigest()
    for entry in [pointer, *pointer["previous"]]:
        entry["sha256"] = new_sha[entry["file"]]
    (run / "state.json").write_text(json.dumps(pointer))


def histories(st: dict) -> dict[int, list]:
    return {m["id"]: m["history"] for m in st["members"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory, ray_head) -> dict[str, str]:
    """Every run of the module joins the session's real `ray start --head` (tests/conftest.py;
    loopback, token auth on) through RAY_ADDRESS, as a run on a cluster does: the storage is under
    test here, not Ray's start."""
    e = {k: v for k, v in ray_head.driver_env.items() if k != "EVO_DEBUG"}
    e.update(EVO_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), WANDB_MODE="disabled",
             RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore")
    return e


@pytest.fixture(scope="module")
def finished(tmp_path_factory, env) -> Path:
    """A run of 2 rounds, finished: commits for round 1, round 2 and the finished mark."""
    storage = tmp_path_factory.mktemp("faults") / "runs"
    out = evo_run(storage, 20, env)
    assert out.returncode == 0, out.stderr[-2000:]
    return storage / "run"


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "runs" / "run")
    return tmp_path / "runs" / "run"


def damage(run: Path, how: str) -> str:
    """Damage the last commit's files as a crash, a bad disk or a careless copy would."""
    ckpt = run / "checkpoints" / "m1" / "s2.pt"
    if how == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif how == "garbled":
        data = bytearray(ckpt.read_bytes())
        data[2000:2100] = os.urandom(100)
        ckpt.write_bytes(bytes(data))
    elif how == "foreign":   # a valid checkpoint of another member copied over it
        shutil.copyfile(run / "checkpoints" / "m0" / "s2.pt", ckpt)
    elif how == "resigned":  # another member's valid checkpoint, the checksums made to match it
        shutil.copyfile(run / "checkpoints" / "m0" / "s2.pt", ckpt)
        sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
        (run / "checkpoints" / "m1" / "s2.pt.sha256").write_text(sha + "\n")

        def edit(body: dict) -> None:   # every body naming it, whole or a delta
            for d in body.get("members", []):
                if d.get("checkpoint") == "checkpoints/m1/s2.pt":
                    d["checkpoint_sha256"] = sha
            changed = (body.get("delta") or {}).get("members", {})
            if "checkpoint" in changed:
                ids, paths = changed["checkpoint"]
                named = [i for i, p in zip(ids if ids is not None else range(len(paths)), paths)
                         if p == "checkpoints/m1/s2.pt"]
                sids, shas = changed["checkpoint_sha256"]
                for i in named:
                    shas[sids.index(i) if sids is not None else i] = sha

        resign(run, edit)
        return f"checkpoint {ckpt} does not match member 1's record (train.lr: "
    elif how == "state":     # the last state body torn (both round-2 commits)
        for name in json.loads((run / "state.json").read_text())["file"], "states/000003.json":
            body = run / name
            body.write_bytes(body.read_bytes()[:-40])
        return "states/000004.json does not match the checksum"
    return f"checkpoint {ckpt} does not match its checksum"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "foreign", "resigned", "state"])
def test_a_damaged_last_commit_resumes_from_the_one_before(finished, tmp_path, env, how):
    run = copy_run(finished, tmp_path)
    before = state(run)
    bad = damage(run, how)
    out = evo_run(run.parent, 30, env)
    assert out.returncode == 0, out.stderr[-2000:]
    warnings = [ln for ln in lines(out) if ln.startswith("warning:")]
    assert len(warnings) == 1, out.stderr
    assert bad in warnings[0] and "resuming from the commit before it, states/000002.json (round 1)" in warnings[0]
    assert "resuming from round 1" in out.stderr
    after = state(run)
    assert after["round"] == 3 and after["status"] == "finished"
    for m, hist in histories(before).items():   # round 2 trained again, to the same numbers (CPU)
        assert histories(after)[m][:2] == hist[:2]


@pytest.mark.slow
def test_no_intact_commit_is_one_line_and_exit_1(finished, tmp_path, env):
    run = copy_run(finished, tmp_path)
    for ckpt in (run / "checkpoints" / "m1").glob("s*.pt"):
        ckpt.write_bytes(ckpt.read_bytes()[:500])
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "lock.json"}
    out = evo_run(run.parent, 30, env)
    assert out.returncode == 1
    assert lines(out) == [f"evo: error: run 'run' cannot be resumed: checkpoint {run}/checkpoints/m1/s2.pt "
                          "does not match its checksum in the committed state (truncated, corrupt, or "
                          "another checkpoint copied over it); none of the 3 commits kept has intact files"]
    assert {p: p.read_bytes() for p in files} == files   # nothing rewritten


def _failed_write(run: Path, env: dict[str, str]) -> None:
    """Resume to round 3 when its checkpoints cannot be written: one line, exit 1, round 2 kept."""
    before = state(run)
    out = evo_run(run.parent, 30, env)
    assert out.returncode == 1
    errors = lines(out)[-1:]
    assert errors[0].startswith("evo: error: cannot write checkpoint ") and len(out.stderr) < 600, out.stderr
    after = state(run)
    assert after["round"] == 2 and after["members"] == before["members"]
    return errors[0]


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_with_one_line(finished, tmp_path, env):
    run = copy_run(finished, tmp_path)
    in_the_way = run / "checkpoints" / "m1" / "s3.pt"
    in_the_way.mkdir()
    assert _failed_write(run, env) == f"evo: error: cannot write checkpoint {in_the_way}: Is a directory"
    in_the_way.rmdir()
    out = evo_run(run.parent, 30, env)   # the same command, once the disk is fixed
    assert out.returncode == 0, out.stderr[-2000:]
    assert state(run)["round"] == 3


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line(finished, tmp_path, env):
    mount = Path(f"/tmp/evo-full-{uuid.uuid4().hex[:8]}")
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        mount.rmdir()
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = copy_run(finished, mount)
        filler = mount / "filler"
        with open(filler, "wb") as f:   # fill it, then leave 64 KiB: the lock fits, a checkpoint not
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        os.truncate(filler, filler.stat().st_size - (1 << 16))
        assert _failed_write(run, env).endswith("No space left on device")
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        mount.rmdir()
