"""Where the CPU of one ``evo run`` goes: CPU seconds per process kind, and inside the members'
processes their training calls against the rest, against a plain pool's CPU for the same steps.

The run's process tree (the driver, Ray's processes, the members, W&B's service, evo's reaper) is
sampled from /proc every ``--period`` seconds until the driver exits: each process's CPU
(utime + stime of /proc/<pid>/stat, its last sample) and, in the driver's and the members'
processes, each thread's (/proc/<pid>/task/<tid>/stat), read more often, every
``--thread-period`` seconds, so that a short call's title is seen. A thread's CPU since the last sample goes
to the group of the name it carries: Ray titles the thread that runs an actor's call by the call
(``ray::Member.train_part``; the member's torch runs one intra-op thread, so training is that
thread's) and names its own threads (core worker, gRPC); population/member.py names a checkpoint
write's thread ``evo-save``. The members' own count of the CPU in their training calls
(``timing.member_cpu_s`` of state.json) is printed beside it. What a process spent after its
last sample (at most one period) is not counted.

The plain pool is bench/startup.py's (``multiprocessing``, 2 processes, the same trainers,
genomes, seeds, steps and evaluations; no Ray): its CPU is the pool process's and its workers'
(``getrusage`` of the reaped child), launch to exit.

CPU seconds, unlike wall seconds, do not stretch much when other work shares the cores; the
1-minute load average before and after is printed anyway.

    .venv/bin/python bench/cpu_census.py                           # quickstart, 4 members x 600 steps, sync
    .venv/bin/python bench/cpu_census.py --mode async --set logging.optuna=false
    .venv/bin/python bench/cpu_census.py --small                   # the smoke test's setting

The table is printed, then one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                    # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

import startup  # noqa: E402  (bench/startup.py: the plain pool)

HZ = os.sysconf("SC_CLK_TCK")
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"

# process kinds, by a piece of the command line (first match wins); the driver is the root
KINDS = [
    ("member", ("ray::Member", ":Member.")),   # ray::<run>/m<id>:Member.<method>
    ("Ray worker, no actor yet", ("ray::IDLE", "workers/default_worker.py")),
    ("other Ray worker", ("ray::",)),
    ("dashboard agent", ("dashboard/agent.py",)),
    ("runtime-env agent", ("runtime_env/agent/main.py",)),
    ("dashboard module processes", ("ray-dashboard-", "ray.dashboard.subprocesses")),   # and their forkserver
    ("dashboard", ("dashboard/dashboard.py",)),
    ("log monitor", ("log_monitor.py",)),
    ("autoscaler monitor", ("autoscaler/_private/monitor.py",)),
    ("GCS", ("gcs_server",)),
    ("raylet", ("raylet/raylet",)),
    ("evo reaper", ("population/reaper.py",)),
    ("W&B service", ("wandb",)),
    ("multiprocessing helpers", ("multiprocessing.",)),
]
RECHECK = {None, "Ray worker, no actor yet", "other"}   # kinds whose command line may still change
ORDER = ["driver", "member", *[k for k, _ in KINDS if k != "member"], "other"]


def kind_of(cmdline: str) -> str:
    """The kind of a process, by its program and script (the command line before its first
    option: options name other programs, e.g. the raylet's name the worker script)."""
    if cmdline == "raylet":   # the raylet rewrites its command line
        return "raylet"
    head = cmdline.split(" --", 1)[0]
    for kind, needles in KINDS:
        if any(n in head for n in needles):
            return kind
    return "other"


def _stat(path: str) -> tuple[int, float, int, str] | None:
    """(ppid, CPU seconds, start time in ticks, comm) of /proc/<pid>[/task/<tid>]/stat."""
    try:
        with open(path + "/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / HZ, int(rest[19]), comm


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Census:
    """The CPU of a process tree, sampled from /proc: per process and, in the driver's and the
    members' processes, per thread. A process is known by (pid, start time)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.procs: dict[tuple[int, int], dict] = {}    # (pid, start) -> cmdline, kind, cpu, threads

    def sample(self) -> None:
        stats = {}
        for d in os.listdir("/proc"):
            if d.isdigit() and (st := _stat(f"/proc/{d}")) is not None:
                stats[int(d)] = st
        tree = {self.root}
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, *_rest) in stats.items():
            children[ppid].append(pid)
        # a process seen before stays in when it is reparented (to init, when its parent exits)
        todo = [self.root] + [pid for pid, start in self.procs if pid in stats and stats[pid][2] == start]
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo.extend(c for c in children.get(pid, ()) if c not in tree)
        for pid in tree:
            if pid not in stats:
                continue
            _, cpu, start, comm = stats[pid]
            proc = self.procs.setdefault((pid, start), {"threads": {}, "kind": None, "cmdline": ""})
            proc["cpu"] = cpu
            if proc["kind"] in RECHECK:   # a worker's title changes with its actor
                proc["cmdline"] = _cmdline(pid) or comm
                proc["kind"] = "driver" if pid == self.root else kind_of(proc["cmdline"])
            if proc["kind"] in ("driver", "member"):
                self._threads(pid, proc["threads"])

    def sample_threads(self) -> None:
        """The driver's and the members' threads only (cheap: a few dozen files), between two
        whole samples, so that the title of a call shorter than ``--period`` is seen."""
        for (pid, start), proc in self.procs.items():
            if proc["kind"] not in ("driver", "member"):
                continue
            st = _stat(f"/proc/{pid}")
            if st is None or st[2] != start:
                continue
            proc["cpu"] = st[1]
            self._threads(pid, proc["threads"])

    @staticmethod
    def _threads(pid: int, threads: dict) -> None:
        """Each thread's CPU since the last sample, added to the group of the thread's name.
        Ray titles the thread that runs an actor's call by the call (ray::Member.train_part)
        and back (ray::Member) when it ends; an untitled thread's CPU goes to its last title."""
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return
        for tid in tids:
            st = _stat(f"/proc/{pid}/task/{tid}")
            if st is None:
                continue
            _, cpu, start, name = st
            rec = threads.setdefault((int(tid), start), {"name": name, "cpu": 0.0, "groups": defaultdict(float)})
            if name not in IDLE_TITLES:
                rec["name"] = name
            rec["groups"][thread_group(pid, int(tid), rec["name"])] += cpu - rec["cpu"]
            rec["cpu"] = cpu

    def table(self) -> dict:
        """Per kind: CPU seconds and process count; the members' and the driver's threads by group."""
        kinds: dict[str, dict] = {}
        groups: dict[str, dict[str, float]] = {"member": defaultdict(float), "driver": defaultdict(float)}
        for proc in self.procs.values():
            k = kinds.setdefault(proc["kind"], {"cpu_s": 0.0, "processes": 0})
            k["cpu_s"] += proc["cpu"]
            k["processes"] += 1
            if proc["kind"] in groups:
                seen = 0.0
                for rec in proc["threads"].values():
                    for group, cpu in rec["groups"].items():
                        groups[proc["kind"]][group] += cpu
                        seen += cpu
                groups[proc["kind"]][GONE] += max(0.0, proc["cpu"] - seen)
        threads = {kind: {g: round(by[g], 2) for g in GROUPS if g in by} for kind, by in groups.items()}
        return {"kinds": {k: kinds[k] for k in ORDER if k in kinds},
                "members_training_s": threads["member"].get(TRAINING, 0.0),
                "member_threads": threads["member"], "driver_threads": threads["driver"]}


TRAINING = "training (train_part, train_and_evaluate calls)"
GONE = "threads gone before a sample"
GROUPS = ["main thread", TRAINING, "other actor calls (exploits, snapshots)", "checkpoint writes (evo-save)",
          "other Python/torch threads", "Ray's threads (core worker, gRPC)", GONE]
IDLE_TITLES = ("ray::Member", "ray::IDLE")    # a call thread between calls
SAVE_THREAD = "evo-save"                      # population/member.py names a checkpoint write's thread


def thread_group(pid: int, tid: int, name: str) -> str:
    """The group of a thread by its name. Ray names its own threads (worker.io, client.poll0,
    ...); a thread that Python or torch started carries the name of the thread that started it."""
    if tid == pid:
        return "main thread"   # a member's: the worker's start, imports, Member.__init__
    if name.startswith(("ray::Member.tra", "ray::Member.train")):   # comm keeps 15 bytes
        return TRAINING
    if name.startswith("ray::"):
        return "other actor calls (exploits, snapshots)"
    if name == SAVE_THREAD:
        return "checkpoint writes (evo-save)"
    if name in ("python", "python3") or name.startswith(("pt_", "torch", "evo-")):
        return "other Python/torch threads"
    return "Ray's threads (core worker, gRPC)"


def evo_command(args: argparse.Namespace, storage: str, name: str) -> list[str]:
    cmd = [sys.executable, "-m", "experiments", "run", str(QUICKSTART)]
    for o in [f"name={name}", f"storage={storage}", f"population.size={args.size}",
              f"population.total_steps={args.total_steps}", f"population.interval_steps={args.interval}",
              f"population.mode={args.mode}", *args.set]:
        cmd += ["--set", o]
    return cmd


def evo_census(args: argparse.Namespace, storage: str) -> dict:
    name = f"census-{args.mode}-{int(time.time())}"
    log = Path(storage) / "evo-run.log"
    launch = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(evo_command(args, storage, name), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    census = Census(proc.pid)
    while proc.poll() is None:
        census.sample()
        deadline = time.monotonic() + args.period
        while (left := deadline - time.monotonic()) > 0 and proc.poll() is None:
            time.sleep(min(args.thread_period, left))
            census.sample_threads()
    wall = time.time() - launch
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:]
        raise SystemExit(f"evo run failed ({proc.returncode}): {tail}")
    from population.store import RunStore

    state = RunStore(storage, name).read_state()
    best = min(m["history"][-1][1] for m in state["members"] if m.get("history"))
    # the members' own count: process CPU during their train/evaluate calls (population/records.py)
    in_calls = float(state.get("timing", {}).get("member_cpu_s", math.nan))
    return {"wall_s": wall, "best_val_bpb": best, "member_cpu_in_calls_s": in_calls, **census.table()}


def pool_census(args: argparse.Namespace) -> dict:
    """bench/startup.py's plain pool, launch to exit; its CPU from the reaped child's rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = startup.pool_run(args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": cpu, "wall_s": run["whole_s"], "train_wall_s": run["train_s"], "best_val_bpb": run["best_val_bpb"]}


def load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from overhead import workload_args   # bench/ is on sys.path

    workload_args(p)
    p.set_defaults(total_steps=600)
    p.add_argument("--small", action="store_true", help="the smoke test: 2 members x 4 steps, a tiny model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override")
    p.add_argument("--period", type=float, default=0.5, help="seconds between two samples of /proc")
    p.add_argument("--thread-period", type=float, default=0.05,
                   help="seconds between two samples of the driver's and the members' threads")
    args = p.parse_args(argv)
    for flag, value in (("--period", args.period), ("--thread-period", args.thread_period)):
        if not value > 0:
            p.error(f"{flag}: must be > 0, got {value}")
    if not Path("/proc/self/stat").exists():
        p.error("needs Linux's /proc")
    if args.small:
        args.size, args.total_steps, args.interval = 2, 4, 2
        args.set = ["model.hidden_size=32", "model.intermediate_size=64", "data.max_bytes=400000",
                    "data.seq_len=32", "data.val_fraction=0.2", "data.eval_batches=1", "data.eval_batch_size=4",
                    "train.batch_size=4", "population.max_concurrent=2", *args.set]
    storage = tempfile.mkdtemp(prefix="evo-bench-census-")
    try:
        load_before = load()
        evo = evo_census(args, storage)
        load_mid = load()
        pool = pool_census(args)
        load_after = load()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    report(args, evo, pool, (load_before, load_mid, load_after))
    return 0


def report(args: argparse.Namespace, evo: dict, pool: dict, loads: tuple[float, float, float]) -> None:
    total = sum(k["cpu_s"] for k in evo["kinds"].values())
    training = evo["members_training_s"]
    print(f"workload: quickstart, {args.size} members x {args.total_steps} steps, interval {args.interval}, "
          f"{args.mode}; plain pool: {startup.POOL} processes; {os.cpu_count()} CPUs")
    print(f"load (1 min): {loads[0]:.2f} before, {loads[1]:.2f} between evo and the pool, {loads[2]:.2f} after")
    print(f"{'process kind':<46} {'procs':>5} {'CPU s':>8}")
    for kind, k in evo["kinds"].items():
        print(f"{kind:<46} {k['processes']:>5} {k['cpu_s']:8.2f}")
        if kind == "member":
            for group, cpu in evo["member_threads"].items():
                print(f"{'  ' + group:<52} {cpu:8.2f}")
            print(f"{'  (timing.member_cpu_s: CPU during train calls)':<52} {evo['member_cpu_in_calls_s']:8.2f}")
        if kind == "driver":
            for group, cpu in evo["driver_threads"].items():
                print(f"{'  ' + group:<52} {cpu:8.2f}")
    print(f"{'evo: all processes':<52} {total:8.2f}")
    print(f"{'evo: not members training':<52} {total - training:8.2f}")
    print(f"{'plain pool: all processes':<52} {pool['cpu_s']:8.2f}")
    share = (total - training) / total if total else float("nan")
    print(f"{'share of evo CPU not training':<52} {share:8.3f}")
    print(f"{'evo CPU / plain pool CPU':<52} {total / pool['cpu_s']:8.3f}")
    print(f"{'evo training CPU / plain pool CPU':<52} {training / pool['cpu_s']:8.3f}")
    print(f"{'evo wall / plain pool wall':<52} {evo['wall_s'] / pool['wall_s']:8.3f}")
    print(json.dumps({"workload": {"size": args.size, "total_steps": args.total_steps, "interval": args.interval,
                                   "mode": args.mode, "pool": startup.POOL, "cpus": os.cpu_count(), "set": args.set},
                      "load": list(loads), "evo": evo, "pool": pool, "evo_cpu_s": total,
                      "not_training_share": share, "evo_over_pool_cpu": total / pool["cpu_s"]}), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
