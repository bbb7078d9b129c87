"""Connecting to Ray: the cluster RAY_ADDRESS names, the one the last ``ray start`` left, or a
local Ray of evo's own.

- RAY_ADDRESS set (``ray job submit`` sets it): that cluster. An address where nothing answers
  is one line (ClusterError) within seconds, never Ray's minutes of retries.
- RAY_ADDRESS unset: Ray itself would follow the address file the last ``ray start`` wrote
  (``ray_current_cluster`` in Ray's temp dir). A live cluster there is used, as Ray would; a
  dead one (a head killed without ``ray stop``) is named in one warning line and evo starts
  its own local Ray at once. RAY_ADDRESS=local always starts evo's own.
- evo's own local Ray listens on loopback only (every port: GCS, raylet, workers, agents,
  dashboard, metrics), takes none of Ray's fixed default ports (see init_local_ray), keeps Ray's
  token authentication, keeps its files in a private temp dir, and is watched by
  population/reaper.py: a driver that is killed takes it along. It runs no log monitor (the
  driver prints no worker logs), and runs Ray's dashboard unless ``logging.ray_dashboard`` is
  false (``connect(dashboard=False)``: no web server, no module processes, less CPU).

A signal while connecting stops the connection (ConnectStopped) instead of waiting it out.
"""
from __future__ import annotations

import contextlib
import inspect
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray
from ray._common.utils import get_ray_address_file
from ray._private import parameter as ray_parameter
from ray._private import ray_constants

__all__ = ["Cluster", "ClusterError", "ConnectStopped", "connect", "init_local_ray"]

PROBE_S = 1.0           # one TCP connection attempt to a GCS
RETRY_FOR_S = 4.0       # RAY_ADDRESS: how long a cluster that does not answer is retried
RAY_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DASHBOARD_METRIC_PORT_ENV = "DASHBOARD_METRIC_PORT"   # read by Ray's dashboard process (dashboard/consts.py)
NODE_STARTUP_TIMEOUT = "timed out during startup"     # Ray's Node: the raylet did not register within 30 s


class ClusterError(RuntimeError):
    """Ray cannot be reached; the message is one line saying what to do."""


class ConnectStopped(ClusterError):
    """SIGTERM/SIGINT arrived while connecting to Ray."""


class Cluster:
    """The Ray this driver uses; ``close()`` shuts down what this driver started."""

    def __init__(self, started: bool, reaper: subprocess.Popen | None = None, root: str | None = None,
                 dashboard_url: str | None = None):
        self.started = started
        self.dashboard_url = dashboard_url   # evo's own local Ray's dashboard (host:port), if it has one
        self._reaper = reaper
        self._root = root

    def close(self) -> None:
        if not self.started:
            return
        try:
            ray.shutdown()
        finally:
            _stop_reaper(self._reaper, self._root)


def connect(console: Any, stopping: Callable[[], bool] = lambda: False, dashboard: bool = True) -> Cluster:
    """Connect this driver to Ray (see the module docstring); ``stopping()`` true aborts.
    ``dashboard`` false starts a local Ray without Ray's dashboard (a cluster joined keeps its own)."""
    if ray.is_initialized():
        return Cluster(started=False)
    env = (os.environ.get("RAY_ADDRESS") or "").strip()
    if env == "local":
        return _start_local_told(console, dashboard)
    if env and env != "auto":
        reason = _unreachable(env, RETRY_FOR_S, stopping)
        if reason:
            raise ClusterError(
                f"RAY_ADDRESS={env}: no Ray cluster answers there ({reason}); start it, or unset "
                "RAY_ADDRESS to let evo start a local Ray"
            )
        return _join(env)
    last = _address_file_cluster()
    if last is None:
        if env == "auto":
            raise ClusterError("RAY_ADDRESS=auto: no Ray cluster was started on this machine "
                               "(`ray start --head`), or unset RAY_ADDRESS")
        return _start_local_told(console, dashboard)
    path, address = last
    reason = _unreachable(address, PROBE_S, stopping)
    if reason is None:
        console.print(f"using the Ray cluster at {address} (the last `ray start`, named in {path}); "
                      "RAY_ADDRESS=local starts evo's own", soft_wrap=True, markup=False, highlight=False)
        return _join(address)
    if env == "auto":
        raise ClusterError(f"RAY_ADDRESS=auto: {path} names {address}, where no Ray cluster answers "
                           f"({reason}); run `ray stop` to remove it, or set RAY_ADDRESS")
    console.print(f"warning: {path} names a Ray cluster at {address} that does not answer ({reason}): "
                  "a `ray start` ended without `ray stop`; starting a local Ray instead "
                  "(`ray stop` removes the file)", soft_wrap=True, markup=False, highlight=False)
    return _start_local_told(console)


def _join(address: str) -> Cluster:
    # Ray turns a loopback address into this machine's network address before connecting (unless
    # its single-machine switch is on), so a cluster that listens on loopback only — a head started
    # with --node-ip-address=127.0.0.1, evo's own kind of Ray — would be retried there forever.
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    if _is_loopback(address):
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: "
                           f"{str(e).strip().splitlines()[0]}") from e
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
    return Cluster(started=False)


def _is_loopback(address: str) -> bool:
    """Whether ``address`` (host:port, ray://host:port) names this machine's loopback interface."""
    host = address.split("://", 1)[-1].rstrip("/").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _start_local_told(console: Any, dashboard: bool = True) -> Cluster:
    """_start_local, then one line with the dashboard's address (no fixed port: see init_local_ray)
    on ``console`` when there is one."""
    cluster = _start_local(dashboard)
    if cluster.dashboard_url and console is not None:   # benches connect with no console
        console.print(f"Ray dashboard: http://{cluster.dashboard_url}", soft_wrap=True, markup=False,
                      highlight=False)
    return cluster


def _start_local(dashboard: bool = True) -> Cluster:
    """A fresh local Ray: loopback only, no fixed ports, token auth on, files in a private temp
    dir, reaped. A node that does not come up in Ray's 30 s is started once more, in a new dir
    with new ports, before the run gives up with one line."""
    for _ in range(2):
        try:
            return _start_local_once(dashboard)
        except Exception as e:
            if NODE_STARTUP_TIMEOUT not in str(e):
                raise
            timed_out = e
    raise ClusterError(
        f"evo's local Ray did not start, twice: its node did not register within Ray's 30 s "
        f"(load average {_load()}); run again when the machine is less busy, or start one with "
        "`ray start --head` and set RAY_ADDRESS to it"
    ) from timed_out


def _start_local_once(dashboard: bool) -> Cluster:
    """One try of _start_local's. Without the ``dashboard``, Ray's dashboard process runs only its
    usage-stats module: no web server, no module processes (ray.init's include_dashboard=False)."""
    root = tempfile.mkdtemp(prefix="evo-ray-")
    saved = {k: os.environ.get(k) for k in ("TMPDIR", RAY_CLUSTERS_ENV)}
    # Ray's own switch for a single-machine Ray (the default on macOS/Windows): the node's
    # address is 127.0.0.1, so every server it starts binds loopback. Its processes read the
    # variable when they start; this process read it when ray was imported, hence the constant.
    os.environ[RAY_CLUSTERS_ENV] = "0"
    # Temporary files of Ray's processes and of the workers (multiprocessing's pymp-* dirs,
    # torch's) land in the private dir, which goes away with the run.
    os.environ["TMPDIR"] = root
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    reaper = None
    try:
        # the reaper first: a ray.init that fails after starting processes leaves none behind
        reaper = _start_reaper(root)
        context = init_local_ray(_temp_dir=os.path.join(root, "ray"), log_to_driver=False,
                                 configure_logging=False, **({} if dashboard else {"include_dashboard": False}))
    except BaseException:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            _stop_reaper(reaper, root)
        raise
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    url = (getattr(context, "dashboard_url", None) or None) if dashboard else None
    return Cluster(started=True, reaper=reaper, root=root, dashboard_url=url)


def init_local_ray(**kwargs: Any) -> Any:
    """``ray.init(address="local", **kwargs)``: a new local Ray that takes none of Ray's fixed
    default ports, so it starts beside any other Ray on the machine."""
    # Ports: a local Ray of ray.init's takes three fixed ones (Ray's defaults for a cluster's
    # head), which any other Ray on the machine — another `evo run`, a `ray start --head`, a test
    # suite's head — may hold, and which a later `ray start --head` asks for exactly:
    # - the dashboard agent's HTTP port 52365. ray.init has no parameter for it (`ray start
    #   --dashboard-agent-listen-port` has). Held, the agent retries for about 3.5 s and then runs
    #   without HTTP; the raylet registers with the GCS only once the agent has settled (seen:
    #   21 ms after the agent gave up), and ray.init waits 30 s for that: on a loaded machine the
    #   delay can tip it over ("The current node timed out during startup"). Port 0 (the OS
    #   picks, the agent reports the port it got) is what Ray's own ray.cluster_utils.Cluster
    #   gives every node on one machine.
    # - the dashboard's 8265: held, Ray's dashboard moves up to the next free one, but held by
    #   evo, a later `ray start --head` (which asks for 8265 exactly) starts without a dashboard.
    #   Port 0: the dashboard binds whatever is free and records the address it got.
    # - the dashboard's metrics server 44227 (DASHBOARD_METRIC_PORT; held, it is skipped with a
    #   logged error, and the address Ray records names the other Ray's server): a free port,
    #   picked here; lost in a race, that server alone is skipped, as before.
    # The agent's gRPC and metrics-export ports, the runtime-env agent's, the GCS's and the
    # raylet's are already picked by the OS.
    # The log monitor: a process that tails every worker's log file and publishes the lines for
    # drivers to print (log_to_driver). evo's driver prints none (log_to_driver=False), and the
    # dashboard and `ray logs` read the files themselves, so a Ray started that way runs without
    # it (≈ 0.6 CPU s a minute, bench/cpu_census.py).
    log_monitor = bool(kwargs.get("log_to_driver", True))
    saved = os.environ.get(DASHBOARD_METRIC_PORT_ENV)
    os.environ[DASHBOARD_METRIC_PORT_ENV] = str(_free_port())
    try:
        with _local_params(log_monitor):
            return ray.init(address="local", dashboard_port=0, **kwargs)
    finally:
        if saved is None:
            os.environ.pop(DASHBOARD_METRIC_PORT_ENV, None)
        else:
            os.environ[DASHBOARD_METRIC_PORT_ENV] = saved


@contextlib.contextmanager
def _local_params(log_monitor: bool):
    """While ray.init builds its RayParams (it looks the class up in ray._private.parameter at
    the call): a dashboard agent listen port it does not set is 0 instead of Ray's fixed 52365,
    and without ``log_monitor`` the node starts no log monitor. A Ray whose RayParams lacks
    such a parameter is left as it is there."""
    base = getattr(ray_parameter, "RayParams", None)
    params = inspect.signature(base.__init__).parameters if base is not None else {}
    defaults = {k: v for k, v in (("dashboard_agent_listen_port", 0), ("include_log_monitor", log_monitor))
                if k in params}
    if not defaults:
        yield
        return

    class RayParams(base):
        def __init__(self, *args: Any, **kwargs: Any):
            for k, v in defaults.items():
                kwargs.setdefault(k, v)
            super().__init__(*args, **kwargs)

    ray_parameter.RayParams = RayParams
    try:
        yield
    finally:
        ray_parameter.RayParams = base


def _free_port() -> int:
    """A TCP port free on every interface now (the dashboard's metrics server binds loopback, or
    every interface when the node is not on loopback)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def _start_reaper(root: str) -> subprocess.Popen:
    from population import reaper

    return subprocess.Popen(
        [sys.executable, reaper.__file__, str(os.getpid()), root],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,   # out of the terminal's process group: Ctrl-C is the driver's
    )


def _stop_reaper(reaper: subprocess.Popen | None, root: str | None) -> None:
    """Close the reaper's pipe (it kills what is left and deletes the temp dir) and wait for it."""
    if reaper is None:
        if root:
            shutil.rmtree(root, ignore_errors=True)
        return
    try:
        reaper.stdin.close()
        reaper.wait(timeout=30)
    except subprocess.TimeoutExpired:
        reaper.kill()


def _address_file_cluster() -> tuple[str, str] | None:
    """(address file, address) of the last ``ray start`` on this machine, as ray.init finds it."""
    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            address = f.read().strip()
    except OSError:
        return None
    return (path, address) if address else None


def _unreachable(address: str, retry_for: float, stopping: Callable[[], bool]) -> str | None:
    """Why nothing answers at ``address`` (host:port, ray://host:port), or None when it does."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return None   # not host:port: ray.init says what is wrong with it
    host = host.strip("[]")
    deadline = time.monotonic() + retry_for
    while True:
        if stopping():
            raise ConnectStopped(f"stopped by a signal while connecting to Ray at {address}")
        try:
            with socket.create_connection((host, int(port)), timeout=PROBE_S):
                return None
        except TimeoutError:
            reason = f"no answer in {PROBE_S:.0f} s"
        except OSError as e:
            reason = e.strerror or str(e)
        if time.monotonic() >= deadline:
            return reason
        time.sleep(0.25)
