"""Orchestration overhead of the driver on the quickstart workload.

Two figures:

- orchestration efficiency = Σ member compute seconds (time inside ``train_part`` and
  ``train_and_evaluate``) / (wall seconds of the round loop × concurrent slots), the slots being
  the members allowed to train at once (``timing.slots`` in the run's state: on this 2-core
  machine 2, one torch thread each, with the 4 members taking turns). 1.0 means no slot ever
  waits: not for the driver (judging, exploits, checkpoints, commits) and not for the sync
  barrier (a member done early while another still trains). Goal on CPU: >= 0.97.
- CPU utilisation = Σ member CPU seconds inside ``train_and_evaluate`` / (wall × cluster CPUs):
  whether the cores are kept busy (members that share a core each count their own share).
- exploit latency: seconds from issuing ``receiver.load_state`` with the reference of the donor's
  state (put into Ray's object store when the donor was evaluated, population/handoff.py) to the
  receiver being done (weights + Adam state + step + RNG, no process restart), median over the
  run (goal: <= 10 ms on the quickstart), next to one disk round trip of the same state
  (``torch.save`` + ``torch.load`` to a temp file) — what a checkpoint-based exploit pays before
  it even restarts a worker.

    .venv/bin/python bench/overhead.py                         # quickstart: 4 members, 500 steps
    .venv/bin/python bench/overhead.py --total-steps 200 --size 4
    .venv/bin/python bench/overhead.py --mode async
    .venv/bin/python bench/overhead.py --small --vs-all-at-once   # the smoke test's setting

The last line printed is every figure as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ray  # noqa: E402
import torch  # noqa: E402

from experiments.config import build_setup, load_config  # noqa: E402
from population.cluster import init_local_ray  # noqa: E402
from population.driver import run_search  # noqa: E402
from population.store import RunStore  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
# --small: 4 members x 6 steps (interval 2, every member judged every round, so exploits happen),
# a tiny model, 2 slots, 2 Ray CPUs; a smoke test of the code paths, its figures mean nothing
SMALL_SET = ["model.hidden_size=32", "model.intermediate_size=64", "data.max_bytes=400000", "data.seq_len=32",
             "data.val_fraction=0.2", "data.eval_batches=1", "data.eval_batch_size=4", "train.batch_size=4",
             "train.warmup_steps=2", "population.max_concurrent=2", "strategy.ready_intervals=1"]


def disk_round_trip(state: dict, repeats: int = 5, durable: bool = False) -> float:
    """Median seconds of torch.save + torch.load of ``state`` through a temporary file
    (``durable``: flushed to the device (fsync) before it is read back, as a checkpoint
    another process or node relies on would be. The goal compares with the non-durable figure,
    which never leaves the page cache)."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(state, f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            torch.load(path, map_location="cpu", weights_only=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def workload_args(p: argparse.ArgumentParser) -> None:
    """The quickstart workload's options (bench/startup.py takes the same)."""
    p.add_argument("--total-steps", type=int, default=500)
    p.add_argument("--size", type=int, default=4)
    p.add_argument("--interval", type=int, default=50)
    p.add_argument("--mode", choices=("sync", "async"), default="sync")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_args(p)
    p.add_argument("--num-cpus", type=float, default=None, help="Ray CPUs (default: the machine's)")
    p.add_argument("--storage", default=None, help="run store root (default: a temporary directory)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override, e.g. --set model.hidden_size=256")
    p.add_argument("--vs-all-at-once", action="store_true",
                   help="run the workload a second time with a slot per member (every member training at "
                        "once, time-sliced by the OS) and compare wall times and results")
    p.add_argument("--small", action="store_true",
                   help="the smoke test: 4 members x 6 steps, interval 2, a tiny model, 2 slots, 2 Ray CPUs")
    args = p.parse_args(argv)
    if args.small:
        args.size, args.total_steps, args.interval = 4, 6, 2
        args.num_cpus = 2 if args.num_cpus is None else args.num_cpus
        args.set = [*SMALL_SET, *args.set]

    storage = args.storage or tempfile.mkdtemp(prefix="evo-overhead-")
    name = f"overhead-{int(time.time())}"
    overrides = [
        f"name={name}", f"storage={storage}",
        f"population.size={args.size}", f"population.total_steps={args.total_steps}",
        f"population.interval_steps={args.interval}", f"population.mode={args.mode}",
        "logging.wandb.mode=disabled", "logging.optuna=false", *args.set,
    ]
    setup = build_setup(load_config(QUICKSTART, overrides))
    init_local_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)  # no fixed ports
    cpus = ray.cluster_resources().get("CPU", 0.0)
    summary = run_search(setup)

    store = RunStore(storage, name)
    state = store.read_state()
    timing = state["timing"]
    slots = timing["slots"]
    compute, wall = timing["member_compute_s"], timing["wall_s"]
    efficiency = compute / (wall * slots)
    cpu_busy = timing["member_cpu_s"] / (wall * cpus)
    latencies = state["exploit_latencies"]
    best = summary["best"]["member"]
    member_state = store.load_checkpoint(state["members"][best]["checkpoint"])
    state_mb = sum(t.numel() * t.element_size() for t in _tensors(member_state)) / 2**20
    disk = disk_round_trip(member_state)
    durable = disk_round_trip(member_state, durable=True)
    exploit = statistics.median(latencies) if latencies else float("nan")
    moved = [r for r in store.read_lineage() if "latency_s" in r and r.get("receiver_s")]
    receiver = {k: statistics.median(r["receiver_s"][k] for r in moved) if moved else float("nan")
                for k in ("read_s", "load_s")}

    out = {
        "workload": f"quickstart, {args.size} members, interval {args.interval}, {args.total_steps} steps, "
                    f"{args.mode}, {cpus:g} CPUs, {setup.population.resources.num_cpus} CPU/member",
        "rounds": state["round"],
        "member_compute_s": round(compute, 2),
        "wall_s": round(wall, 2),
        "slots": slots,
        "orchestration_efficiency": round(efficiency, 4),
        "member_cpu_s": round(timing["member_cpu_s"], 2),
        "cpu_utilisation": round(cpu_busy, 4),
        "exploits": len(latencies),
        "state_mb": round(state_mb, 2),
        "exploit_latency_median_s": round(exploit, 4),
        "exploit_latency_max_s": round(max(latencies), 4) if latencies else None,
        "disk_save_load_s": round(disk, 4),
        "disk_save_fsync_load_s": round(durable, 4),
        "exploit_over_disk": round(exploit / disk, 3),
        "receiver_read_median_s": round(receiver["read_s"], 5),
        "receiver_load_median_s": round(receiver["load_s"], 5),
        "best_val_bpb": round(summary["best"]["val_bpb"], 4),
    }
    print(f"orchestration efficiency  {efficiency:.3f}  (Σ compute {compute:.1f} s / "
          f"(wall {wall:.1f} s × {slots} slots); goal >= 0.97)")
    print(f"  CPU utilisation  {cpu_busy:.3f}  (member CPU seconds {timing['member_cpu_s']:.1f} s / "
          f"(wall {wall:.1f} s × {cpus:g} CPUs))")
    print(f"exploit latency (median)  {exploit * 1e3:.1f} ms over {len(latencies)} exploits (goal <= 10 ms); "
          f"disk save+load of the same {state_mb:.2f} MB state {disk * 1e3:.1f} ms; ratio {exploit / disk:.3f}")
    print(f"  with the save flushed to the device (fsync) {durable * 1e3:.1f} ms; ratio {exploit / durable:.3f}")
    print(f"  inside the receiver (medians): reading from the object store {receiver['read_s'] * 1e3:.2f} ms, "
          f"loading {receiver['load_s'] * 1e3:.2f} ms; the rest is the Ray call")
    if args.vs_all_at_once:
        all_name = f"{name}-all"
        run_search(build_setup(load_config(QUICKSTART, [*overrides, f"name={all_name}",
                                                        f"population.max_concurrent={args.size}"])))
        other = RunStore(storage, all_name).read_state()
        o_timing = other["timing"]
        o_eff = o_timing["member_compute_s"] / (o_timing["wall_s"] * o_timing["slots"])
        same = [m["history"] for m in other["members"]] == [m["history"] for m in state["members"]]
        print(f"all at once ({o_timing['slots']} slots): wall {o_timing['wall_s']:.1f} s, efficiency {o_eff:.3f}, "
              f"CPU utilisation {o_timing['member_cpu_s'] / (o_timing['wall_s'] * cpus):.3f}; "
              f"wall with {slots} slots / all at once = {wall / o_timing['wall_s']:.3f}; "
              f"same fitness histories: {same}")
        out.update(all_at_once_wall_s=round(o_timing["wall_s"], 2), all_at_once_efficiency=round(o_eff, 4),
                   wall_ratio_vs_all_at_once=round(wall / o_timing["wall_s"], 3), same_histories=same)
    print(json.dumps(out))
    ray.shutdown()
    return 0


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


if __name__ == "__main__":
    raise SystemExit(main())
