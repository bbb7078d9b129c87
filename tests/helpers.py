"""Shared helpers for the end-to-end tests that drive the real `evo` CLI and a real Ray cluster."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EVO = str(BIN / "evo")
RAY = str(BIN / "ray")
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")

# The quickstart scaled down so a whole search takes seconds on 2 cores.
TINY = [
    "population.size=2",
    "population.interval_steps=10",
    "population.total_steps=40",
    "population.resources.num_cpus=0.5",
    "data.seq_len=32",
    "data.max_bytes=300000",
    "data.eval_batches=2",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "logging.wandb.mode=disabled",
    "logging.optuna=false",
]


def set_args(overrides: list[str]) -> list[str]:
    """`--set k=v` pairs for the CLI."""
    args: list[str] = []
    for o in overrides:
        args += ["--set", o]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evo_env(cache_dir: Path | str) -> dict[str, str]:
    env = dict(os.environ)
    env["EVO_CACHE_DIR"] = str(cache_dir)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


def evo_status(storage: str | Path, name: str, env: dict[str, str]) -> dict | None:
    """`evo status RUN --json` parsed, or None while the run has no committed round."""
    out = subprocess.run(
        [EVO, "status", name, "--storage", str(storage), "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def read_lineage(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "lineage.jsonl").read_text().splitlines() if line.strip()]


# Fields of a lineage record that depend on the wall clock, not on the search.
_CLOCK_FIELDS = {"time", "timestamp", "latency_s", "receiver_s", "seconds", "wall_s", "tokens_per_s"}


def comparable_lineage(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in _CLOCK_FIELDS} for r in records]


def member_processes(mark: str) -> dict[int, str]:
    """{pid: process title} of this run's member processes (Ray names them ``ray::Member…``),
    told from other runs on the machine by a variable of the driver's environment they inherit."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            if not title.startswith("ray::Member"):
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark.encode() not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        found[int(entry)] = title
    return found


def proc_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


class RayHead:
    """A real `ray start --head --block` on loopback with token authentication (the session's one is
    tests/conftest.py's ``ray_head``): `ray job submit` goes to ``address``; an `evo run` given ``driver_env``
    joins it through RAY_ADDRESS, as a driver on a cluster does, and pays no Ray start of its own.

    The token lives in the test's own directory (RAY_AUTH_TOKEN_PATH) so ~/.ray is untouched;
    stopping it is SIGTERM to the blocking process, which takes the whole cluster down.
    """

    def __init__(self, root: Path, env: dict[str, str], num_cpus: int = 2):
        self.root = root
        self.token_path = root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.env = dict(env)
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # what a driver on the cluster is given (RAY_ADDRESS, as `ray job submit` sets it), token auth on
        self.driver_env = dict(self.env, RAY_ADDRESS=f"127.0.0.1:{self.gcs_port}")
        temp_dir = Path(f"/tmp/evo-ray-{os.getpid()}-{secrets.token_hex(3)}")
        temp_dir.mkdir()
        self.temp_dir = temp_dir
        self.log = open(root / "ray_head.log", "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", f"--num-cpus={num_cpus}",
             # not Ray's fixed 52365: another Ray on the machine holding it would refuse every job
             f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: see {self.root / 'ray_head.log'}")
            r = subprocess.run([RAY, "job", "list", "--address", self.address],
                               env=self.env, capture_output=True, text=True)
            if r.returncode == 0:
                return
            time.sleep(1.0)
        raise RuntimeError("ray head did not come up in time")

    def job(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, "job", args[0], "--address", self.address, *args[1:]],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)   # the cluster's session files and sockets


def sigterm_at_round(store, round: int, timeout: float) -> "threading.Thread":
    """A started daemon thread that sends this process SIGTERM once ``store``'s committed state
    is a running run at ``round`` or later (an in-process driver's stop); it gives up after
    ``timeout`` seconds. Join it after the search returns."""
    import threading

    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = store.read_state() if store.exists() else None
            if state and state["round"] >= round and state["status"] == "running":
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
