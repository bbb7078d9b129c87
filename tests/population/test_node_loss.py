"""Node loss on a real two-node Ray cluster on this machine (issue 15, item 3).

A head (127.0.0.2) and a worker node (127.0.0.3), each a `ray start --block` with one CPU and
token authentication on; a real `evo run` (2 members of 1 CPU: one on each node) joins it through
RAY_ADDRESS. Mid-run every process of the worker node (its raylet, agents and the member's
worker) is SIGKILLed: the node is lost. A replacement node (127.0.0.4) joins, as an autoscaler or
an operator would bring one back. The run finishes with exit 0, every member at the budget, the
lost member restored from its own state (a ``restored`` lineage record that says "node lost" and
names the node), and `evo status` counts the restore.

The cluster is this test's own: its files in a temp dir of its own, and every process of it
killed at the end, found by that dir (never `ray stop`: it stops every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from population.inspect import _member_restores
from population.store import RunStore
from tests.helpers import EVO, QUICKSTART, RAY, TINY, evo_env, evo_status, free_port, read_lineage, set_args

INTERVAL, TOTAL = 10, 100
HEAD_IP, WORKER_IP, REPLACEMENT_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
# (Ray turns 127.0.0.1 into the machine's address for a multi-node cluster; 127.0.0.2-4 are
# loopback too and kept as they are.) A node is declared dead after ~2 s of missed health
# checks instead of Ray's default ~30 s, so that the test stays short.
HEALTH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
          "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "4"}

WAIT_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 120
while time.time() < deadline:
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    if len(alive) >= int(sys.argv[2]):
        print(" ".join(alive))
        break
    time.sleep(0.2)
"""


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _with_dir(root: str) -> list[int]:
    """Processes whose command line names ``root`` (every process of the test's cluster does)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if root.encode() in f.read():
                        out.append(int(d))
            except OSError:
                pass
    return out


def _kill(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class TwoNodes:
    """A head and worker nodes on loopback addresses, all `ray start --block`, token auth on."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), **HEALTH)
        # short: Ray's socket paths live under it (AF_UNIX paths are at most 107 bytes)
        self.temp_dir = f"/tmp/evn-{secrets.token_hex(4)}"
        os.mkdir(self.temp_dir)
        self.address = f"{HEAD_IP}:{free_port()}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self._start(HEAD_IP, "--head", f"--port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=false")

    def _start(self, ip: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"ray-{ip}.log", "w")
        self.nodes[ip] = subprocess.Popen(
            [RAY, "start", "--block", f"--node-ip-address={ip}", "--num-cpus=1", "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}", f"--dashboard-agent-listen-port={free_port()}", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self.nodes[ip]

    def add_worker(self, ip: str) -> None:
        self._start(ip, f"--address={self.address}")

    def wait_alive(self, n: int) -> list[str]:
        """The addresses of the alive nodes once there are ``n`` (asked through Ray's GCS)."""
        out = subprocess.run([sys.executable, "-c", WAIT_NODES, self.address, str(n)], env=self.env,
                             capture_output=True, text=True, timeout=180)
        alive = out.stdout.split()
        assert len(alive) >= n, f"{n} nodes did not come up: {out.stdout[-2000:]}{out.stderr[-2000:]}"
        return alive

    def lose(self, ip: str) -> list[int]:
        """SIGKILL every process of node ``ip`` (`ray start`, raylet, agents, workers) at once."""
        pids = _tree(self.nodes[ip].pid)
        _kill(pids)
        self.nodes[ip].wait()
        deadline = time.time() + 30   # SIGKILL is delivered, not waited for: until they are gone
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.05)
        return pids

    def close(self) -> None:
        """Kill every process of the cluster (each node's tree, then any left naming its dir)."""
        for proc in self.nodes.values():
            _kill(_tree(proc.pid))
        for _ in range(3):
            _kill(_with_dir(self.temp_dir))
            time.sleep(0.2)
        for proc in self.nodes.values():
            proc.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _committed_round(run_dir: Path) -> int:
    try:
        pointer = json.loads((run_dir / "state.json").read_text())
        return int(pointer["round"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
def test_a_lost_node_s_member_is_restored_from_its_own_state(tmp_path):
    cluster = TwoNodes(tmp_path, evo_env(tmp_path / "cache"))
    run = None
    try:
        cluster.add_worker(WORKER_IP)
        assert sorted(cluster.wait_alive(2)) == [HEAD_IP, WORKER_IP]

        storage, name = tmp_path / "runs", "lost"
        overrides = TINY + [f"population.interval_steps={INTERVAL}", f"population.total_steps={TOTAL}",
                            "population.resources.num_cpus=1", "logging.optuna=true"]
        out = open(tmp_path / "evo.out", "w")
        run = subprocess.Popen([EVO, "run", QUICKSTART, "--storage", str(storage), "--name", name,
                                *set_args(overrides)],
                               env=dict(cluster.env, RAY_ADDRESS=cluster.address), stdout=out,
                               stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while _committed_round(storage / name) < 2 and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert run.poll() is None and _committed_round(storage / name) >= 2, (tmp_path / "evo.out").read_text()

        killed = cluster.lose(WORKER_IP)          # mid-run: round 2 committed, round 3 training
        lost_at = _committed_round(storage / name)
        assert not any(_alive(p) for p in killed)
        cluster.add_worker(REPLACEMENT_IP)        # the lost member's new process goes there
        assert run.wait(timeout=400) == 0, (tmp_path / "evo.out").read_text()[-4000:]
        text = (tmp_path / "evo.out").read_text()
        assert "Traceback" not in text, text[-4000:]

        status = evo_status(storage, name, cluster.env)
        assert status["status"] == "finished" and status["round"] == TOTAL // INTERVAL
        assert [m["step"] for m in status["members"]] == [TOTAL, TOTAL]
        lineage = read_lineage(storage / name)
        restored = [r for r in lineage if r["event"] == "restored"]
        # the member that lived on the lost node, and only it, came back (one member per node)
        assert len(restored) == 1, restored
        [r] = restored
        assert r["round"] >= lost_at and r["parents"] == []
        assert re.fullmatch(rf"node lost: node [0-9a-f]{{12}} at {re.escape(WORKER_IP)}( \(.+\))?", r["error"]), r
        # from its own state: the object store's copy (lost with the node when it lived there
        # alone) or its own last checkpoint, at a point of its own history; never a donor's copy
        assert r["source"] in ("object store", "checkpoint")
        m = r["member"]
        final = RunStore(storage, name).read_state()
        assert [r["step"], r["fitness"]] in final["members"][m]["history"]
        assert not [x for x in lineage if x["event"] in ("died", "restart")]
        assert final["failures"] == 0 and final["restores"] == 1 and final["member_restores"] == {str(m): 1}

        # evo status shows the restore: per member (json and table) and in the headline
        assert [x["restores"] for x in status["members"]] == [int(i == m) for i in range(2)]
        assert status["restores"] == 1 and status["failures"] == 0
        table = subprocess.run([EVO, "status", name, "--storage", str(storage)], env=cluster.env,
                               capture_output=True, text=True, timeout=120)
        assert table.returncode == 0, table.stderr
        assert "1 restore" in table.stdout.splitlines()[0], table.stdout
        header = next(ln for ln in table.stdout.splitlines() if ln.split()[:1] == ["id"])
        assert header.split()[-1] == "restored", table.stdout
        rows = {int(ln.split()[0]): ln.split()[-1] for ln in table.stdout.splitlines()
                if ln.split()[:1] and ln.split()[0].isdigit()}
        assert rows == {i: str(int(i == m)) for i in range(2)}, table.stdout
        # the Optuna study and the report say it too
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
        marked = [t for t in study.get_trials() if t.user_attrs.get("restores")]
        assert [(t.user_attrs["member"], t.user_attrs["restores"]) for t in marked] == [(m, 1)]
        assert marked[0].user_attrs["last_restore"]["why"] == r["error"]
        assert "0 died, 1 restored" in (storage / name / "report" / "report.html").read_text()
    finally:
        if run is not None and run.poll() is None:
            _kill(_tree(run.pid))
            run.wait()
        cluster.close()
    assert _with_dir(cluster.temp_dir) == [] and not os.path.exists(cluster.temp_dir)


def test_restores_of_a_run_committed_before_the_per_member_counts_come_from_its_lineage(tmp_path):
    """A state without ``member_restores`` (written before evo counted them per member): the
    committed lineage's ``restored`` records are counted; records past the commit are not."""
    store = RunStore(str(tmp_path), "old")
    store.create({"name": "old"})
    records = [{"event": e, "round": r, "member": m} for e, r, m in
               [("born", 0, 0), ("born", 0, 1), ("restored", 1, 1), ("exploit", 1, 0), ("restored", 2, 1),
                ("restored", 2, 0), ("restored", 3, 0)]]
    store.append_lineage(records)
    assert _member_restores(store, {"restores": 3, "lineage_count": 6}) == {1: 2, 0: 1}
    assert _member_restores(store, {"restores": 0, "lineage_count": 7}) == {}
    assert _member_restores(store, {"member_restores": {"1": 4}, "restores": 4}) == {1: 4}
