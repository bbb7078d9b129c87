"""Whole-process overhead of ``evo run``: launch to exit, against a plain 2-process pool.

Four figures, each a fresh process timed from launch to exit (this machine's speed drifts, so the
pool is measured right before and right after evo, in the same run, and the ratio uses their mean):

- ray.init alone: a bare script that imports ray and calls ``ray.init`` with evo's options (a
  local Ray, loopback only, a private temp dir; Ray's dashboard as ``logging.ray_dashboard`` in
  the ``--set`` overrides leaves it, on by default), then shuts it down; launch to ``ray.init``
  returning, and the ``ray.init`` call by itself.
- evo: ``python -m experiments run`` of the quickstart (any ``--set`` on top). Its start-up is
  launch to the first round starting (the loop's clock: ``state.json``'s last ``updated`` minus
  its ``timing.wall_s``), then the round loop, then the tail (report, shutdown, exit).
- plain pool: ``multiprocessing`` (spawn) with 2 processes, each training whole members with the
  same ``trainers.Trainer``, the same initial genomes and seeds evo samples, the same optimizer
  steps, evaluating after every interval as evo does: no exploits, no checkpoints, no Ray.

    .venv/bin/python bench/startup.py                     # quickstart, 4 members x 500 steps, sync
    .venv/bin/python bench/startup.py --mode async
    .venv/bin/python bench/startup.py --small             # the smoke test's setting (seconds of training)
    .venv/bin/python bench/startup.py --modes sync,async  # pool, evo sync, evo async, pool: both
                                                          # modes' ratios use the pools before and after

Besides the whole process, the round loop is compared with the pool's own training span (its
first member starting to its last member finishing): the issue's "round loop ÷ plain pool ≤ 1.02".

The table is printed, then one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
POOL = 2

RAY_ALONE = r"""
import os, sys, tempfile, time
launch, dashboard = float(sys.argv[1]), sys.argv[2] == "1"
import ray
from ray._private import ray_constants
from population.cluster import init_local_ray   # evo's ray.init: none of Ray's fixed ports
root = tempfile.mkdtemp(prefix="evo-bench-ray-")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray_constants.ENABLE_RAY_CLUSTER = False
t0 = time.time()
init_local_ray(_temp_dir=os.path.join(root, "ray"), log_to_driver=False, configure_logging=False,
               **({} if dashboard else {"include_dashboard": False}))   # as evo's, logging.ray_dashboard
t1 = time.time()
ray.shutdown()
import shutil; shutil.rmtree(root, ignore_errors=True)
print(f"{t0 - launch} {t1 - t0} {t1 - launch}")
"""


def overrides(args: argparse.Namespace, name: str, storage: str) -> list[str]:
    return [f"name={name}", f"storage={storage}", f"population.size={args.size}",
            f"population.total_steps={args.total_steps}", f"population.interval_steps={args.interval}",
            f"population.mode={args.mode}", "logging.optuna=false", "logging.wandb.mode=disabled", *args.set]


def ray_alone(dashboard: bool = True) -> dict:
    """``ray.init`` alone, as evo's local Ray starts it, with Ray's dashboard or without (evo's
    ``logging.ray_dashboard``), so that evo's start-up is compared with the same Ray."""
    launch = time.time()
    out = subprocess.run([sys.executable, "-c", RAY_ALONE, repr(launch), "1" if dashboard else "0"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    exit_s = time.time() - launch
    before, init, ready = (float(x) for x in out.stdout.split()[-3:])
    return {"import_s": before, "ray_init_s": init, "launch_to_ready_s": ready, "process_s": exit_s,
            "dashboard": dashboard}


def dashboard_of(settings: list[str]) -> bool:
    """``logging.ray_dashboard`` as the ``--set`` overrides leave it (the last one wins; default on)."""
    value = True
    for item in settings:
        key, _, text = item.partition("=")
        if key.strip() == "logging.ray_dashboard":
            value = yaml.safe_load(text) is not False
    return value


def evo_run(args: argparse.Namespace, storage: str, name: str) -> dict:
    cmd = [sys.executable, "-m", "experiments", "run", str(QUICKSTART)]
    for o in overrides(args, name, storage):
        cmd += ["--set", o]
    launch = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    whole = time.time() - launch
    if out.returncode != 0:
        raise SystemExit(f"evo run failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    from population.store import RunStore

    state = RunStore(storage, name).read_state()
    loop = float(state["timing"]["wall_s"])
    startup = float(state["updated"]) - loop - launch
    best = min(m["history"][-1][1] for m in state["members"] if m.get("history"))
    return {"startup_s": startup, "loop_s": loop, "tail_s": whole - startup - loop, "whole_s": whole,
            "best_val_bpb": best}


def pool_run(args: argparse.Namespace) -> dict:
    launch = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--pool-child", json.dumps(vars(args))]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    whole = time.time() - launch
    if out.returncode != 0:
        raise SystemExit(f"plain pool failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    return {"startup_s": child["first_task"] - launch, "whole_s": whole, "best_val_bpb": child["best_val_bpb"],
            "train_s": child["last_done"] - child["first_task"]}


# -- the plain pool (runs in its own process: ``--pool-child``) -----------------------------------


def member_trainer(model, train, data, genome: dict, seed: int):
    """The Trainer of one member as evo builds it: the genome's train.* and model.* genes over the
    base configs, the member's seed, one torch thread (bench/peers.py's peers train the same)."""
    import torch

    from trainers.trainer import Trainer

    torch.set_num_threads(1)
    train_fields = {k.split(".", 1)[1]: v for k, v in genome.items() if k.startswith("train.")}
    model_fields = {k.split(".", 1)[1]: v for k, v in genome.items() if k.startswith("model.")}
    return Trainer(dataclasses.replace(model, **model_fields),
                   dataclasses.replace(train, **train_fields, seed=seed, num_threads=1), data)


def _member_work(job: tuple) -> dict:
    """Train one member for its whole budget, evaluating after every interval (as evo does)."""
    started = time.time()
    model, train, data, genome, seed, total, interval = job
    trainer = member_trainer(model, train, data, genome, seed)
    history = []
    while trainer.step < total:
        trainer.train(min(interval, total - trainer.step))
        history.append(trainer.evaluate()["val_bpb"])
    return {"started": started, "finished": time.time(), "history": history}


def pool_child(params: dict) -> int:
    args = argparse.Namespace(**params)
    import numpy as np

    from experiments.config import build_setup, load_config
    from population.records import member_seed

    setup = build_setup(load_config(QUICKSTART, overrides(args, "pool", "unused")))
    train = dataclasses.replace(setup.train, decay_steps=setup.train.decay_steps or args.total_steps)
    rng = np.random.default_rng([setup.seed, 0])   # the genomes evo's run samples (population/records.py)
    jobs = [(setup.model, train, setup.data, setup.space.sample(rng).as_dict(), member_seed(setup.seed, m),
             args.total_steps, args.interval) for m in range(args.size)]
    with multiprocessing.get_context("spawn").Pool(POOL) as pool:
        done = pool.map(_member_work, jobs, chunksize=1)
    print(json.dumps({"first_task": min(d["started"] for d in done), "last_done": max(d["finished"] for d in done),
                      "best_val_bpb": min(d["history"][-1] for d in done)}))
    return 0


# -- the table ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pool-child"]:   # the pool's own process: it imports no ray
        return pool_child(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from overhead import workload_args   # bench/ is on sys.path when this file runs

    workload_args(p)
    p.add_argument("--small", action="store_true", help="the smoke test: 2 members x 4 steps, a tiny model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override")
    p.add_argument("--modes", default=None, metavar="MODE,MODE",
                   help="several modes in one run, e.g. sync,async: the evo runs one after another between one pool run "
                        "before and one after")
    args = p.parse_args(argv)
    if args.small:
        args.size, args.total_steps, args.interval = 2, 4, 2
        args.set = ["model.hidden_size=32", "model.intermediate_size=64", "data.max_bytes=400000",
                    "data.seq_len=32", "data.val_fraction=0.2", "data.eval_batches=1", "data.eval_batch_size=4", "train.batch_size=4",
                    "population.max_concurrent=2", *args.set]

    modes = args.modes.split(",") if args.modes else [args.mode]
    bad = [m for m in modes if m not in ("sync", "async")]
    if bad:
        p.error(f"--modes: {bad[0]!r} is not a mode (sync, async)")
    storage = tempfile.mkdtemp(prefix="evo-bench-startup-")
    alone = ray_alone(dashboard_of(args.set))
    before = pool_run(args)
    runs = {}
    for mode in modes:
        args.mode = mode
        runs[mode] = evo_run(args, storage, f"startup-{mode}-{int(time.time())}")
    after = pool_run(args)
    for mode, evo in runs.items():
        args.mode = mode
        report(args, alone, before, evo, after)
    shutil.rmtree(storage, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, alone: dict, before: dict, evo: dict, after: dict) -> None:
    pool_whole = (before["whole_s"] + after["whole_s"]) / 2
    pool_train = (before["train_s"] + after["train_s"]) / 2
    rows = [
        ("ray.init alone: launch to ready", alone["launch_to_ready_s"]),
        ("  of which the ray.init call", alone["ray_init_s"]),
        ("evo: launch to the first round", evo["startup_s"]),
        ("  over ray.init alone (launch to ready)", evo["startup_s"] - alone["launch_to_ready_s"]),
        ("evo: round loop", evo["loop_s"]),
        ("evo: after the last round to exit", evo["tail_s"]),
        ("evo: whole process", evo["whole_s"]),
        ("plain pool before: whole process", before["whole_s"]),
        ("plain pool after: whole process", after["whole_s"]),
        ("plain pool: launch to the first task", (before["startup_s"] + after["startup_s"]) / 2),
        ("plain pool: first task to last done", pool_train),
    ]
    print(f"workload: quickstart, {args.size} members x {args.total_steps} steps, interval {args.interval}, "
          f"{args.mode}; plain pool: {POOL} processes; {os.cpu_count()} CPUs")
    for label, seconds in rows:
        print(f"{label:<42} {seconds:8.2f} s")
    ratio = evo["whole_s"] / pool_whole
    loop_ratio = evo["loop_s"] / pool_train
    print(f"{'whole process / plain pool (mean)':<42} {ratio:8.3f}")
    print(f"{'round loop / pool training (mean)':<42} {loop_ratio:8.3f}")
    print(json.dumps({"workload": {"size": args.size, "total_steps": args.total_steps, "interval": args.interval,
                                   "mode": args.mode, "pool": POOL, "cpus": os.cpu_count(), "set": args.set},
                      "ray_alone": alone, "evo": evo, "pool_before": before, "pool_after": after,
                      "whole_over_pool": ratio, "loop_over_pool_training": loop_ratio}), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
