"""A simulated multi-node Ray cluster running sleep-trainer members: orchestration efficiency and
exploit latency across nodes.

The script starts ``ray.cluster_utils.Cluster`` on this machine: a head and worker nodes, each a
full Ray node (its own raylet, object store and workers) with ``--cpus-per-node`` logical CPUs,
at 127.0.0.1, with Ray's token authentication on (a token of this run's own) and every file —
the session directories and the ``ray_current_cluster`` address file — in a private temporary
directory, so no other Ray on the machine ever finds it. It then runs a real ``evo run`` (``python
-m experiments run`` of the quickstart with ``population.trainer.kind: sleep``) against it as a
user would against a cluster: ``RAY_ADDRESS`` set to the head. Everything but the training is
real: the driver, one Member actor per member spread by Ray over the nodes, the exploits through
the object store (a donor's state pulled to the receiver's node when they differ), the
checkpoints and the run store. The cluster is shut down by this script when it ends.

Reported, from the run store and Ray's actor table:

- orchestration efficiency: summary.json's ``timing.efficiency`` (the members' compute seconds ÷
  (the round loop's wall × the slots used));
- the round loop's wall (``timing.wall_s``) against the ideal, rounds × interval × step_s (every
  member sleeps at once: ``population.max_concurrent`` = members);
- exploit latency (the lineage's ``latency_s`` of each exploit: the receiver reading the donor's
  state from the object store and loading it), median and max, all exploits and split by whether
  the donor's node is the receiver's (same node: a read of shared memory) or not (across nodes:
  Ray's transfer); the ratio across ÷ same is the figure's baseline, measured in the same run;
- each member's node (the actor table's node of ``<run>/m<id>``) and the members per node;
- launch to exit of ``evo run``, and the memory (PSS) of the member processes;
- that the cluster refuses a client without the token (a GCS call from a process without
  ``RAY_AUTH_MODE`` and without a token file).

All nodes share this machine's cores: a loaded machine stretches every figure, and a transfer
"across nodes" is a copy between two processes of one machine through Ray's object manager, not a
network. The memory check refuses a setting whose member processes would not fit in the memory
available (each imports torch and ray: about 0.2 GB).

    .venv/bin/python bench/cluster_sim.py --out bench-out            # 4 nodes x 4 CPUs, 64 members
    .venv/bin/python bench/cluster_sim.py --small --out bench-out    # the smoke test: 2 nodes, 8 members
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from population.store import RunStore  # noqa: E402

QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
NAME = "sim"
FULL = dict(nodes=4, cpus_per_node=4, members=64, rounds=5, interval=20, step_s=0.1, state_kb=256)
SMALL = dict(nodes=2, cpus_per_node=2, members=8, rounds=2, interval=5, step_s=0.05, state_kb=64)
MEMBER_MB = 200          # what one member process takes (PSS measured here: 197 MB, torch + ray imported)
EVO_TIMEOUT_S = 1800     # the evo run; a hang is an error, not a wait


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="2 nodes, 8 members, 2 rounds (smoke test)")
    ap.add_argument("--nodes", type=int, help=f"Ray nodes, the head included (default {FULL['nodes']})")
    ap.add_argument("--cpus-per-node", type=int, help=f"logical CPUs per node (default {FULL['cpus_per_node']})")
    ap.add_argument("--members", type=int, help=f"population size (default {FULL['members']})")
    ap.add_argument("--rounds", type=int, help=f"rounds (default {FULL['rounds']})")
    ap.add_argument("--interval", type=int, help=f"steps per round (default {FULL['interval']})")
    ap.add_argument("--step-s", type=float, help=f"seconds each step sleeps (default {FULL['step_s']})")
    ap.add_argument("--state-kb", type=int, help=f"KiB of tensors per member state (default {FULL['state_kb']})")
    ap.add_argument("--strategy", default="pbt", choices=("pbt", "pb2", "ga"))
    ap.add_argument("--out", default="bench-out", help="folder for cluster_sim.json")
    args = ap.parse_args(argv)
    for key, value in (SMALL if args.small else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check(args: argparse.Namespace) -> str | None:
    """Why this setting cannot run (one line), or None."""
    if args.nodes < 1 or args.cpus_per_node < 1 or args.members < 2 or args.rounds < 1 or args.interval < 1:
        return "--nodes, --cpus-per-node, --rounds and --interval must be >= 1 and --members >= 2"
    if not (args.step_s >= 0 and math.isfinite(args.step_s)) or args.state_kb < 1:
        return "--step-s must be >= 0 and --state-kb >= 1"
    need = args.members * MEMBER_MB
    available = _mem_available_mb()
    if available is not None and need > 0.9 * available:
        return (f"{args.members} member processes need about {need / 1024:.1f} GB ({MEMBER_MB} MB each), "
                f"but {available / 1024:.1f} GB are available: use fewer --members")
    return None


def _kib_field(path: str, field: str) -> float | None:
    """MB of a "<field>: <n> kB" line of a /proc file (meminfo, smaps_rollup), None if unreadable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _mem_available_mb() -> float | None:
    return _kib_field("/proc/meminfo", "MemAvailable")


def _pss_mb(pid: int) -> float | None:
    return _kib_field(f"/proc/{pid}/smaps_rollup", "Pss")


def evo_command(args: argparse.Namespace, storage: str) -> list[str]:
    per_member = args.nodes * args.cpus_per_node / args.members   # the population fills the cluster
    sets = [f"population.size={args.members}", "population.mode=sync",
            f"population.interval_steps={args.interval}", f"population.total_steps={args.rounds * args.interval}",
            f"population.resources.num_cpus={per_member!r}", f"population.max_concurrent={args.members}",
            "population.trainer.kind=sleep", f"population.trainer.step_s={args.step_s!r}",
            f"population.trainer.state_kb={args.state_kb}", f"strategy.name={args.strategy}",
            "logging.wandb.mode=disabled", "logging.optuna=false"]
    return [sys.executable, "-m", "experiments", "run", str(QUICKSTART), "--name", NAME, "--storage", storage,
            *[a for s in sets for a in ("--set", s)]]


def exploits_by_node(lineage: list[dict], node_of: dict[int, str]) -> list[dict]:
    """Every exploit of the lineage (an event with a latency: the receiver read a donor's state)
    with the receiver's and the donor's node."""
    out = []
    for rec in lineage:
        if rec.get("latency_s") is None or not rec.get("parents"):
            continue
        receiver, donor = int(rec["member"]), int(rec["parents"][0])
        out.append({"event": rec["event"], "round": rec.get("round"), "receiver": receiver, "donor": donor,
                    "receiver_node": node_of.get(receiver), "donor_node": node_of.get(donor),
                    "across": node_of.get(receiver) != node_of.get(donor), "latency_s": float(rec["latency_s"])})
    return out


def latency_stats(values: list[float]) -> dict:
    return {"count": len(values), "median_s": statistics.median(values) if values else None,
            "max_s": max(values) if values else None}


def figures(args: argparse.Namespace, summary: dict, lineage: list[dict], node_of: dict[int, str],
            node_names: dict[str, str], launch_to_exit_s: float, cluster_start_s: float,
            member_pss_mb: list[float]) -> dict:
    timing = summary.get("timing", {})
    ideal = args.rounds * args.interval * args.step_s
    wall = timing.get("wall_s")
    exploits = exploits_by_node(lineage, node_of)
    same = [e["latency_s"] for e in exploits if not e["across"]]
    across = [e["latency_s"] for e in exploits if e["across"]]
    per_node = {name: sum(1 for m in node_of.values() if m == node) for node, name in node_names.items()}
    same_stats, across_stats = latency_stats(same), latency_stats(across)
    ratio = (across_stats["median_s"] / same_stats["median_s"]
             if same_stats["median_s"] and across_stats["median_s"] is not None else None)
    return {
        "setting": {k: getattr(args, k) for k in ("nodes", "cpus_per_node", "members", "rounds", "interval",
                                                  "step_s", "state_kb", "strategy")},
        "status": summary.get("status"), "rounds_done": summary.get("round"),
        "efficiency": timing.get("efficiency"), "slots": timing.get("slots"),
        "loop_wall_s": wall, "ideal_s": ideal,
        "loop_over_ideal": wall / ideal if wall is not None and ideal > 0 else None,
        "launch_to_exit_s": launch_to_exit_s, "cluster_start_s": cluster_start_s,
        "summary_exploit_latency_s": summary.get("exploit_latency_s"),
        "exploits": {"all": latency_stats([e["latency_s"] for e in exploits]), "same_node": same_stats,
                     "across_nodes": across_stats, "across_over_same_median": ratio},
        "members_per_node": per_node, "nodes_used": sum(1 for n in per_node.values() if n),
        "member_node": {str(m): node_names.get(n, n) for m, n in sorted(node_of.items())},
        "member_pss_mb": {"median": statistics.median(member_pss_mb) if member_pss_mb else None,
                          "max": max(member_pss_mb) if member_pss_mb else None, "count": len(member_pss_mb)},
        "exploit_records": [dict(e, receiver_node=node_names.get(e["receiver_node"], e["receiver_node"]),
                                 donor_node=node_names.get(e["donor_node"], e["donor_node"])) for e in exploits],
        "load_avg": list(os.getloadavg()),
    }


def _f(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(r: dict) -> str:
    s = r["setting"]
    ex = r["exploits"]
    spread = " ".join(f"{k}={v}" for k, v in r["members_per_node"].items())

    def lat(d: dict) -> str:
        return f"{d['count']} | {_f(d['median_s'])} | {_f(d['max_s'])}"

    rows = [
        "| figure | value |", "|---|---|",
        f"| setting | {s['nodes']} nodes x {s['cpus_per_node']} CPUs, {s['members']} sleep members, "
        f"{s['rounds']} rounds x {s['interval']} steps x {s['step_s']} s, state {s['state_kb']} KiB, {s['strategy']} |",
        f"| members per node | {spread} |",
        f"| nodes used | {r['nodes_used']} of {s['nodes']} |",
        f"| a client without the token | {r['auth']} |",
        f"| orchestration efficiency (timing.efficiency) | {_f(r['efficiency'])} |",
        f"| slots | {_f(r['slots'], '{}')} |",
        f"| round loop wall s (timing.wall_s) | {_f(r['loop_wall_s'], '{:.2f}')} |",
        f"| ideal s (rounds x interval x step_s) | {_f(r['ideal_s'], '{:.2f}')} |",
        f"| loop wall / ideal | {_f(r['loop_over_ideal'], '{:.2f}')} |",
        f"| evo run launch to exit s | {_f(r['launch_to_exit_s'], '{:.1f}')} |",
        f"| cluster start s | {_f(r['cluster_start_s'], '{:.1f}')} |",
        f"| member process PSS MB (median / max) | {_f(r['member_pss_mb']['median'], '{:.0f}')} / "
        f"{_f(r['member_pss_mb']['max'], '{:.0f}')} |",
        "", "| exploits | count | latency median s | latency max s |", "|---|---|---|---|",
        f"| all | {lat(ex['all'])} |",
        f"| same node | {lat(ex['same_node'])} |",
        f"| across nodes | {lat(ex['across_nodes'])} |",
        f"| across / same (median) | {_f(ex['across_over_same_median'], '{:.2f}')} | | |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    problem = check(args)
    if problem:
        print(f"cluster_sim: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = tempfile.mkdtemp(prefix="evo-sim-", dir="/tmp")   # short: Ray's socket paths live below it
    token = Path(root) / "token"
    token.write_text(secrets.token_hex(32))
    # Before ray is imported: this process (the GCS client of the Cluster object) and every node it
    # starts use token authentication with this run's token, and Ray's temp dir — the sessions and
    # the ray_current_cluster address file that cluster_utils writes — is the private one.
    # A node's raylet gives its agents (Python processes) agent_register_timeout_ms to start, then
    # aborts: on a loaded machine, with several nodes starting at once, that is too short.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=root,
                      RAY_agent_register_timeout_ms="600000")
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # the finally below runs
    cluster = None
    try:
        from ray.cluster_utils import Cluster

        t0 = time.perf_counter()
        node_args = dict(num_cpus=args.cpus_per_node, node_ip_address="127.0.0.1", include_dashboard=False,
                         object_store_memory=max(80, 4 * args.members * args.state_kb // 1024) * 2**20)
        cluster = Cluster(initialize_head=True, head_node_args=dict(node_args, dashboard_port=_free_port()))
        for _ in range(args.nodes - 1):
            cluster.add_node(**{k: v for k, v in node_args.items() if k != "include_dashboard"})
        cluster.wait_for_nodes()
        cluster_start_s = time.perf_counter() - t0
        nodes = [cluster.head_node, *sorted(cluster.worker_nodes, key=lambda n: n.unique_id)]
        node_names = {n.node_id: ("head" if i == 0 else f"worker{i}") for i, n in enumerate(nodes)}
        print(f"cluster: {args.nodes} nodes at {cluster.address} ({cluster_start_s:.1f} s)", file=sys.stderr, flush=True)

        auth = token_refusal(cluster.address, root)
        storage = str(Path(root) / "runs")
        env = dict(os.environ, RAY_ADDRESS=cluster.address, WANDB_MODE="disabled")
        pss: list[float] = []
        t1 = time.perf_counter()
        proc = subprocess.Popen(evo_command(args, storage), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(EVO_TIMEOUT_S, proc.kill)   # a hang is an error, not a wait
        watchdog.start()
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("round 1/") and not pss:   # members are up and resident: their memory
                pss = [p for a in _member_actors(cluster) if (p := _pss_mb(a["Pid"])) is not None]
        code = proc.wait()
        watchdog.cancel()
        launch_to_exit_s = time.perf_counter() - t1
        if code != 0:
            print(f"cluster_sim: evo run exited {code}:\n{''.join(lines[-30:])}", file=sys.stderr)
            return 1
        run = Path(storage) / NAME
        summary = json.loads((run / "summary.json").read_text())
        lineage = RunStore(storage, NAME).read_lineage()
        node_of = {int(a["Name"].rsplit("/m", 1)[1]): a["Address"]["NodeID"] for a in _member_actors(cluster)}
        if len(node_of) != args.members:
            print(f"cluster_sim: the actor table names {len(node_of)} of {args.members} members", file=sys.stderr)
            return 1
        result = figures(args, summary, lineage, node_of, node_names, launch_to_exit_s, cluster_start_s, pss)
        result["auth"] = auth
    finally:
        if cluster is not None:
            cluster.shutdown()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in result['load_avg'])}; "
          f"all nodes share this machine's {os.cpu_count()} cores")
    print(table(result))
    (out / "cluster_sim.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"json: {out / 'cluster_sim.json'}")
    return 0


def token_refusal(address: str, root: str) -> str:
    """What the cluster's GCS answers a client without the token (with ``RAY_AUTH_MODE`` unset and
    no token file): "refused" when it refuses it, as a token-authenticated cluster must."""
    probe = f"from ray._raylet import GcsClient\nGcsClient(address={address!r}, cluster_id=None).get_all_node_info(timeout=30)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = root   # no ~/.ray/auth_token either
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "AuthenticationError" in r.stderr:
        return "refused"
    return "accepted" if r.returncode == 0 else f"failed otherwise (exit {r.returncode})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _member_actors(cluster) -> list[dict]:
    """The actor table's entries of this run's members (``sim/m<id>``), the latest per member."""
    latest: dict[str, dict] = {}
    for a in cluster.global_state.actor_table(None).values():
        name = a.get("Name") or ""
        if name.startswith(f"{NAME}/m") and (name not in latest or a["StartTime"] > latest[name]["StartTime"]):
            latest[name] = a
    return list(latest.values())


if __name__ == "__main__":
    sys.exit(main())
