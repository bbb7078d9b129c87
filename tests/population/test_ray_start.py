"""How `evo run` starts and connects to Ray, and what its Ray leaves behind (issue 15, items 2, 5,
6, 8): a stale `ray start` address file, an unreachable RAY_ADDRESS, a locked run and an unusable
storage refused before Ray starts, loopback-only ports, and a killed driver's Ray gone with it.

Real `evo` processes, a real `ray start --head` killed with SIGKILL, real sockets and /proc.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from population.store import RunStore
from tests.helpers import EVO, QUICKSTART, RAY, REPO, TINY, evo_env, free_port, set_args


@pytest.fixture
def short_tmp():
    """A short private TMPDIR: Ray's socket paths under it must stay under the unix limit."""
    path = Path(tempfile.mkdtemp(prefix="evt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(tmp_path: Path, tmpdir: Path, **extra: str) -> dict[str, str]:
    env = evo_env(tmp_path / "cache")
    env["TMPDIR"] = str(tmpdir)
    env.pop("RAY_TMPDIR", None)
    env.update(extra)
    return env


def _evo_run(storage: Path, name: str, env: dict[str, str], *extra: str) -> list[str]:
    return [EVO, "run", QUICKSTART, "--storage", str(storage), "--name", name, *set_args(TINY + list(extra))]


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and "Token authentication is enabled" not in ln]


def _descendants(root: int) -> set[int]:
    """Live (non-zombie) descendants of ``root``, from /proc."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        if rest[0] != "Z":
            parent[int(name)] = int(rest[1])
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        for child, pp in parent.items():
            if pp == p and child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rfind(")") + 2:].split()[0] != "Z":
            alive.add(pid)
    return alive


# ---------------------------------------------------------------------------------------------
# Refused before Ray starts


def test_unreachable_ray_address_is_one_line(tmp_path, short_tmp):
    port = free_port()   # nothing listens there
    env = _env(tmp_path, short_tmp, RAY_ADDRESS=f"127.0.0.1:{port}")
    r = subprocess.run(_evo_run(tmp_path / "runs", "r", env), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = _lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there" in lines[0]
    assert "unset RAY_ADDRESS" in lines[0]
    assert not (tmp_path / "runs" / "r").exists()
    assert os.listdir(short_tmp) == []


def test_sigterm_while_connecting_stops_the_run(tmp_path, short_tmp):
    env = _env(tmp_path, short_tmp, RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    run_dir = tmp_path / "runs" / "r"
    p = subprocess.Popen(_evo_run(tmp_path / "runs", "r", env), env=env, stderr=subprocess.PIPE, text=True)
    # the lock is taken right before connecting: once it exists, the driver is probing the address
    while not (run_dir / "lock.json").exists() and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 1, err
    assert _lines(err) == [_lines(err)[0]] and "stopped by a signal while connecting to Ray" in err
    assert not run_dir.exists()   # the lock released, the empty run directory removed


def test_second_driver_on_a_live_run_is_refused_before_ray(tmp_path, short_tmp):
    storage = tmp_path / "runs"
    env = _env(tmp_path, short_tmp)
    with RunStore(str(storage), "busy").lock():   # this test process is the live driver
        r = subprocess.run(_evo_run(storage, "busy", env), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = _lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert f"locked by pid {os.getpid()} on host {socket.gethostname()}" in lines[0]
    assert "Token authentication" not in r.stderr   # Ray never started
    assert os.listdir(short_tmp) == []


def _unwritable_dir(tmp_path: Path) -> str:
    if os.geteuid() == 0:
        return "/sys/evo-storage-test"   # sysfs refuses new directories even to root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return str(ro / "runs")


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unusable_storage_is_one_line_before_ray(tmp_path, short_tmp, kind):
    if kind == "file":
        storage = tmp_path / "a_file"
        storage.write_text("not a directory\n")
        expected = f"{storage} is a file, not a directory"
    else:
        storage = _unwritable_dir(tmp_path)
        expected = "not writable"
    env = _env(tmp_path, short_tmp)
    r = subprocess.run(_evo_run(Path(storage), "r", env), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"storage {str(storage)!r} cannot hold run 'r'" in lines[0] and expected in lines[0], lines[0]
    assert "Token authentication" not in r.stderr


# ---------------------------------------------------------------------------------------------
# A failure while the members are being created


@pytest.mark.slow
def test_a_failure_while_the_members_are_created_is_one_line_and_the_run_resumes(tmp_path, short_tmp):
    """The members' actors are created before the monitor's sinks are built, so a failure there
    finds no monitor to close: a corpus too short for one window (read by the driver as the
    members are created) is one line and exit 1, round 0 stays committed (marked failed), and
    once the corpus holds enough text the same command resumes from round 0 and finishes."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x = 1\n")
    env = _env(tmp_path, short_tmp)
    storage = tmp_path / "runs"
    cmd = _evo_run(storage, "r", env, f"data.corpus={corpus}", "logging.optuna=true")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in _lines(r.stderr) if not ln.startswith("Ray dashboard:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("evo: error: DataError: data.seq_len:") and "too small" in lines[0], lines[0]
    state = RunStore(str(storage), "r").read_state()
    assert state["round"] == 0 and state["status"] == "failed"
    assert not (storage / "r" / "optuna.db").exists()   # no sink was built
    assert not (storage / "r" / "lock.json").exists()

    source = Path(json.__file__).parent   # the stdlib's json package: enough text for every split
    corpus.write_text("".join(p.read_text() for p in sorted(source.glob("*.py"))))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming from round 0" in again.stderr
    state = RunStore(str(storage), "r").read_state()
    assert state["status"] == "finished" and state["round"] == 4
    assert (storage / "r" / "summary.json").exists()


# ---------------------------------------------------------------------------------------------
# A stale `ray start`


def _files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()]


@pytest.mark.slow
def test_stale_ray_start_address_file_warns_and_runs_locally(tmp_path, short_tmp):
    """A head killed without `ray stop` leaves ray_current_cluster behind; evo names the dead
    address in one warning, runs on its own local Ray and leaves no temporary file.

    The same run (W&B offline, the Optuna study on, token authentication on, a HOME of its own)
    carries a planted WANDB_API_KEY and Ray token: neither appears in anything it writes — the run
    store, W&B's offline files, the report, Ray's session logs, HOME, stdout and stderr. (That
    check was tests/test_secrets.py's own run; one run with its own Ray serves both.)"""
    ray_tmp = Path(tempfile.mkdtemp(prefix="evr-", dir="/tmp"))   # Ray's socket paths must stay short
    try:
        base = _env(tmp_path, short_tmp, RAY_TMPDIR=str(ray_tmp))
        port = free_port()
        head_env = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
        (tmp_path / "token").write_text("0" * 64)
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
             # not Ray's fixed 52365: another Ray on the machine holding it on loopback makes this
             # head's raylet give up waiting for its agent, and no address file is written
             f"--dashboard-agent-listen-port={free_port()}"],
            env=head_env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        address_file = ray_tmp / "ray" / "ray_current_cluster"
        deadline = time.time() + 120
        while not address_file.exists() and time.time() < deadline and head.poll() is None:
            time.sleep(0.2)
        assert address_file.exists(), "ray start wrote no address file:\n" + (tmp_path / "head.log").read_text()[-3000:]
        os.killpg(head.pid, signal.SIGKILL)   # no `ray stop`: the file stays, the GCS is gone
        head.wait()
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                time.sleep(0.1)   # a child of the head still listening: wait for it to die
            except OSError:
                break
        dead = address_file.read_text().strip()

        home = tmp_path / "home"          # ~/.ray/auth_token of this run lands here, not in the real home
        home.mkdir()
        wandb_key = secrets.token_hex(20)  # W&B keys are 40 hex characters
        ray_token = secrets.token_hex(32)
        env = {k: v for k, v in base.items() if not k.startswith(("RAY_", "WANDB_", "EVO_"))}
        env.update(
            HOME=str(home), WANDB_API_KEY=wandb_key, RAY_AUTH_TOKEN=ray_token, RAY_AUTH_MODE="token",
            WANDB_DIR=str(tmp_path / "wandb"), RAY_TMPDIR=str(ray_tmp), EVO_CACHE_DIR=base["EVO_CACHE_DIR"],
            RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore",
        )
        r = subprocess.run(_evo_run(tmp_path / "runs", "stale", env, "model.num_hidden_layers=1",
                                    "logging.wandb.mode=offline", "logging.optuna=true"),
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
        assert len(warnings) == 1, r.stderr
        assert f"names a Ray cluster at {dead} that does not answer" in warnings[0]
        assert "ray stop" in warnings[0]
        assert (tmp_path / "runs" / "stale" / "summary.json").is_file()
        assert os.listdir(short_tmp) == []   # no pymp-*, no Ray session, nothing

        written = _files(tmp_path / "runs", tmp_path / "wandb", ray_tmp, home)
        names = {p.name for p in written}
        assert "report.html" in names and "state.json" in names and "optuna.db" in names
        assert any(p.suffix == ".wandb" for p in written), "W&B wrote no offline run"
        planted = {"WANDB_API_KEY": wandb_key.encode(), "the Ray token": ray_token.encode()}
        hits = [f"{what} in {p}" for p in written for what, value in planted.items() if value in p.read_bytes()]
        hits += [f"{what} in {stream}" for stream, data in (("stdout", r.stdout), ("stderr", r.stderr))
                 for what, value in planted.items() if value.decode() in data]
        assert hits == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# evo's own Ray: loopback only, and gone with a killed driver


_LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$")


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket of ``pids`` (`ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.append((line.split()[3], min(owners & pids)))
    return found


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` to list listening sockets")
def test_local_ray_listens_on_loopback_and_dies_with_a_killed_driver(tmp_path, short_tmp):
    env = _env(tmp_path, short_tmp)
    run = subprocess.Popen(_evo_run(tmp_path / "runs", "k", env, "population.total_steps=1000000"),
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None:
            status = tmp_path / "runs" / "k" / "state.json"
            if status.exists():
                break   # a round is committed: members, agents and workers are all up
            time.sleep(0.5)
        assert run.poll() is None, "evo run ended early"
        ours = _descendants(run.pid) | {run.pid}
        sockets = _listening(ours)
        assert len(sockets) >= 4, sockets   # at least the GCS, the raylet, the driver, a member
        assert all(_LOOPBACK.match(addr) for addr, _ in sockets), sockets

        run.send_signal(signal.SIGKILL)
        run.wait()
        left = _alive(ours - {run.pid})
        for _ in range(30):   # up to 15 s
            if not left:
                break
            time.sleep(0.5)
            left = _alive(left)
        assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]
        assert os.listdir(short_tmp) == []   # the reaper removed Ray's session and temp files
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def _agent_ports(tmpdir: Path) -> dict[str, int]:
    """{port file name (it names the node): port} the dashboard agents of the local Rays under ``tmpdir`` reported (Ray
    writes the port its agent's HTTP server bound, or -1 when it could bind none)."""
    found = {}
    try:
        files = list(tmpdir.glob("evo-ray-*/ray/session_*/dashboard_agent_listen_port_*"))
    except OSError:
        return found   # a run's temp dir went away while the glob walked it: the next poll reads the rest
    for f in files:
        try:
            text = f.read_text().strip()
        except OSError:
            continue   # the run ended and its temp dir went away
        if text.lstrip("-").isdigit():
            found[f.name] = int(text)   # session_latest links to the session: the same file twice
    return found


@pytest.mark.slow
def test_two_local_rays_at_once_take_no_fixed_port(tmp_path, short_tmp):
    """Two `evo run`s that each start their own local Ray at the same time both finish, and each
    Ray's dashboard agent serves HTTP on a port of its own. Ray's default, a fixed 52365 that
    ray.init cannot change, went to whichever agent bound first; the other retried for seconds
    and ran without HTTP (port -1), and on a loaded machine that delay let ray.init's 30 s wait
    for the node run out ("The current node timed out during startup")."""
    storage = tmp_path / "runs"
    env = _env(tmp_path, short_tmp)
    runs = {name: subprocess.Popen(_evo_run(storage, name, env, "population.total_steps=20"), env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("a", "b")}
    ports: dict[str, int] = {}
    try:
        deadline = time.time() + 540
        while any(p.poll() is None for p in runs.values()) and time.time() < deadline:
            ports.update(_agent_ports(short_tmp))   # read while the runs live: their dirs go with them
            time.sleep(0.2)
        outputs = {name: p.communicate(timeout=60) for name, p in runs.items()}
    finally:
        for p in runs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p in runs.items():
        assert p.returncode == 0, f"run {name}: {outputs[name][1][-3000:]}"
        assert (storage / name / "state.json").is_file()
        assert json.loads((storage / name / "summary.json").read_text())["status"] == "finished"
    # each run names its own dashboard's address (no fixed port, so the user is told where)
    dashboards = {name: re.findall(r"^Ray dashboard: http://127\.0\.0\.1:(\d+)$", err, re.M)
                  for name, (_, err) in outputs.items()}   # the driver's lines go to stderr
    assert all(len(v) == 1 for v in dashboards.values()), outputs
    assert dashboards["a"] != dashboards["b"], dashboards
    # one agent per run (one more per start retried after Ray's startup timeout, on a busy machine)
    assert len(ports) >= 2, ports
    assert all(v > 0 and v != 52365 for v in ports.values()) and len(set(ports.values())) >= 2, ports
    assert os.listdir(short_tmp) == []


def _cmdlines(pids: set[int]) -> set[str]:
    out = set()
    for pid in pids:
        try:
            out.add(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_ray_dashboard_off_runs_no_dashboard_and_no_log_monitor(tmp_path, short_tmp):
    """`logging.ray_dashboard: false`: evo's local Ray runs without the dashboard's web server and
    module processes (its dashboard process loads only Ray's usage-stats module), and no line
    names a dashboard. evo's local Ray never runs a log monitor (nothing reads it: the driver
    prints no worker logs)."""
    storage = tmp_path / "runs"
    env = _env(tmp_path, short_tmp)
    run = subprocess.Popen(_evo_run(storage, "nodash", env, "logging.ray_dashboard=false"), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    try:
        deadline = time.time() + 540
        while run.poll() is None and time.time() < deadline:
            seen |= _cmdlines(_descendants(run.pid))
            time.sleep(0.2)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, err[-3000:]
    assert json.loads((storage / "nodash" / "summary.json").read_text())["status"] == "finished"
    assert any("gcs_server" in c for c in seen) and any(":Member." in c for c in seen), seen   # Ray was seen
    assert not [c for c in seen if "ray-dashboard-" in c or "ray.dashboard.subprocesses" in c]
    assert all("--disable-frontend" in c for c in seen if "dashboard/dashboard.py" in c), seen
    assert not [c for c in seen if "log_monitor.py" in c]
    assert "Ray dashboard" not in out + err


# A driver whose first local Ray "times out during startup" once its processes are up (Ray's
# Node raising the exception it raises when the raylet does not register in 30 s), then, after a
# good start and close, one that fails twice before starting anything. Prints one JSON line.
_RETRY_SCRIPT = r"""
import json, os, sys
import ray
import ray._private.node as node_mod
from population import cluster

original = node_mod.Node.__init__
plan = {"after_start": 1, "before_start": 0}
first = {}

def init(self, *args, **kwargs):
    if plan["before_start"]:
        plan["before_start"] -= 1
        raise Exception("The current node timed out during startup. (injected before start)")
    original(self, *args, **kwargs)
    if plan["after_start"]:
        plan["after_start"] -= 1
        first["pids"] = [p.process.pid for infos in self.all_processes.values() for p in infos]
        first["temp_dir"] = self.get_temp_dir_path()
        raise Exception("The current node timed out during startup. (injected after start)")

node_mod.Node.__init__ = init
c = cluster._start_local()
out = {"first": first, "second_root": c._root,
       "second_works": ray.get(ray.remote(lambda: 41 + 1).remote()) == 42,
       "pids_of_first_alive_during_second": [p for p in first["pids"] if os.path.exists(f"/proc/{p}")
                                             and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"],
       "first_dir_exists": os.path.exists(first["temp_dir"])}
c.close()
plan["before_start"] = 2
try:
    cluster._start_local()
    out["error"] = None
except cluster.ClusterError as e:
    out["error"] = str(e)
out["initialized_after_error"] = ray.is_initialized()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_local_ray_start_timeout_is_retried_once_then_one_line(tmp_path, short_tmp):
    """Ray's "The current node timed out during startup" (injected into Ray's Node; the Ray around
    it is real): the first try's processes and files are gone, the second try is a working Ray;
    two in a row are one line naming the load, and Ray is left uninitialized."""
    env = _env(tmp_path, short_tmp)
    r = subprocess.run([sys.executable, "-c", _RETRY_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["first"]["pids"]) >= 3, out   # GCS, raylet, dashboard... were up when it failed
    assert out["pids_of_first_alive_during_second"] == [], out
    assert not out["first_dir_exists"] and not out["first"]["temp_dir"].startswith(out["second_root"])
    assert out["second_works"] is True
    error = out["error"]
    assert error and "\n" not in error, out
    assert "evo's local Ray did not start, twice" in error and "load average" in error and "RAY_ADDRESS" in error
    assert out["initialized_after_error"] is False
    assert os.listdir(short_tmp) == []


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("127.0.1.1:6379", True), ("[::1]:6379", True),
    ("ray://127.0.0.1:10001", True), ("10.0.0.5:6379", False), ("head.example:6379", False),
])
def test_a_loopback_address_is_joined_on_loopback(address, loopback):
    # Ray would connect to this machine's network address instead (and retry there forever)
    from population.cluster import _is_loopback

    assert _is_loopback(address) is loopback
