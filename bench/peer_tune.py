"""A peer of evo's ``pbt``: Ray Tune's PopulationBasedTraining over the same ``trainers.Trainer``.

What a Tune user would write: evo's Trainer wrapped as a Tune *function trainable with
checkpoints* (every ``interval`` optimizer steps it evaluates and calls ``tune.report`` with the
validation bits/byte and a checkpoint of the whole trainer state; a (re)started trial continues
from ``tune.get_checkpoint()``), scheduled by ``PopulationBasedTraining`` with Tune's defaults
(quantile_fraction 0.25, resample_probability 0.25, perturbation factors 1.2 / 0.8, no clipping
to the genes' bounds), perturbation_interval one iteration (= ``interval`` steps), and
``reuse_actors=True``. Each trial takes 1 CPU and one torch thread; Ray is started as evo starts
its own (``population.cluster``: loopback only, token auth on, a private temp dir), so the
machine's CPUs give the slots (2 trials at once on a 2-core machine). With fewer slots than
trials, Tune's PBT pauses a trial after every result and runs the least advanced one
(time-multiplexing): each pause is a checkpoint save and each resume a restore.

The genes: ``hyperparam_mutations`` holds the search space's ``train.*`` genes with their
bounds (float: ``tune.loguniform`` / ``tune.uniform``; int: ``tune.randint``; choice: the list).
An architecture gene (``model.*``) is *not* perturbed: a trial keeps the depth of its initial
genome until it exploits another trial, when it takes that trial's depth along with its weights
(Tune's exploit copies the donor's whole config), so the config always matches the checkpoint.
Perturbing the depth would leave a checkpoint whose weights do not fit the new config; searching
the shape live is what only evo does (its architecture genes carry the weights over).

Every trial starts from one of the given genomes (a grid over their indices), trains with its
own seed (``population.records.member_seed(seed, trial index)``, as evo seeds member i) and the
same cosine horizon as evo (``train.decay_steps`` or the whole budget).

    .venv/bin/python bench/peer_tune.py --seed 0 --total-steps 400 --interval 50 --size 4 \\
        --set search.model.num_hidden_layers=null
    .venv/bin/python bench/peer_tune.py --small    # the smoke test's setting

It prints the best validation bits/byte and the wall time, then one JSON line with the result
(``curve``: one row per reported result, in the order results arrived: optimizer steps trained
so far by all trials, wall seconds since the call started, best val_bpb so far).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "data.max_bytes=400000", "data.seq_len=32",
         "data.val_fraction=0.2", "data.eval_batches=1", "data.eval_batch_size=4", "train.batch_size=4"]


def _trial_index(trial_id: str) -> int:
    """The trial's index in the grid (Tune names trial i ``<experiment>_0000i``)."""
    m = re.search(r"_(\d+)$", trial_id)
    return int(m.group(1)) if m else 0


def _trainable(config: dict, *, model, train, data, seed: int, total: int, interval: int) -> None:
    """One trial: build the Trainer, continue from Tune's checkpoint if there is one, then train
    ``interval`` steps, evaluate and report (with a checkpoint) until ``total`` steps."""
    import torch
    from ray import tune

    from population.records import member_seed
    from trainers.trainer import Trainer

    torch.set_num_threads(1)
    index = _trial_index(tune.get_context().get_trial_id())
    genome = config["genome"]
    train_fields = {k.split(".", 1)[1]: v for k, v in genome.items() if k.startswith("train.")}
    model_fields = {k.split(".", 1)[1]: v for k, v in genome.items() if k.startswith("model.")}
    trainer = Trainer(dataclasses.replace(model, **model_fields),
                      dataclasses.replace(train, **train_fields, seed=member_seed(seed, index), num_threads=1), data)
    restored_from = -1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:   # a resume after a pause (its own state) or an exploit (the donor's)
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        trainer.load_state_dict(saved["trainer"])   # weights, Adam moments, step; the saver's hparams
        trainer.set_hparams(**train_fields)           # this trial's (perturbed) values from now on
        restored_from = int(saved["trial"])
    while trainer.step < total:
        n = min(interval, total - trainer.step)
        trainer.train(n)
        val_bpb = trainer.evaluate()["val_bpb"]
        with tempfile.TemporaryDirectory() as d:
            torch.save({"trainer": trainer.state_dict(), "trial": index}, os.path.join(d, "state.pt"))
            tune.report({"val_bpb": val_bpb, "step": trainer.step, "trained": n, "trial": index,
                         "restored_from": restored_from}, checkpoint=tune.Checkpoint.from_directory(d))
        restored_from = -1


def _mutations(space, genes: list[str]) -> dict:
    """Tune's hyperparam_mutations for the ``train.*`` genes among ``genes`` (see the docstring)."""
    from ray import tune

    from evo.space import ChoiceGene, FloatGene, IntGene

    out = {}
    for path in genes:
        if not path.startswith("train."):
            continue
        g = space.gene(path)
        if isinstance(g, FloatGene):
            out[path] = tune.loguniform(g.low, g.high) if g.log else tune.uniform(g.low, g.high)
        elif isinstance(g, IntGene):
            out[path] = tune.randint(g.low, g.high + 1)
        elif isinstance(g, ChoiceGene):
            out[path] = list(g.choices)
    return out


def run_tune_pbt(*, genomes: list[dict], setup, seed: int, total_steps: int, interval: int,
                 wall_budget_s: float | None, workdir: str, slots: int | None = None) -> dict:
    """Run Tune's PBT over ``genomes`` (one trial each) for ``total_steps`` steps a trial.

    Returns ``best_val_bpb``, ``wall_s`` (the whole call: Ray start to shutdown), ``curve``
    (``[steps trained by all trials so far, wall since the call started, best so far]`` per
    result, in arrival order), ``steps`` (optimizer steps trained in all: an exploit moves a
    trial to its donor's step, so this can differ from len(genomes) x total_steps),
    ``restores`` (trial starts from a checkpoint), ``exploits`` (those from another trial's),
    ``final_steps`` (each trial's last step). ``slots``: trials at once (default: Ray's CPUs,
    1 CPU a trial); fewer slots give each trial a larger CPU share (its torch still takes one
    thread), so all trials exist from the start and PBT time-multiplexes them."""
    started = time.time()
    from ray import tune

    from population.cluster import connect

    genes = sorted({k for g in genomes for k in g})
    train = dataclasses.replace(setup.train, decay_steps=setup.train.decay_steps or total_steps)
    curve: list[list[float]] = []
    tally = {"steps": 0, "best": math.inf, "restores": 0, "exploits": 0, "final": {}}

    class Curve(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            tally["steps"] += int(result["trained"])
            tally["best"] = min(tally["best"], float(result["val_bpb"]))
            if result["restored_from"] >= 0:
                tally["restores"] += 1
                tally["exploits"] += int(result["restored_from"] != result["trial"])
            tally["final"][int(result["trial"])] = int(result["step"])
            curve.append([tally["steps"], time.time() - started, tally["best"]])

    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"   # evo's own local Ray, never a cluster left by `ray start`
    try:
        cluster = connect(console=None)
    finally:
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
    try:
        import numpy as np
        import ray

        cpus = ray.cluster_resources()["CPU"]
        if __name__ != "__main__":   # imported (bench/ is no package): Ray's workers cannot import
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # it, so ship its code
        # PBT draws donors and perturbations from the random module, resamples from numpy's
        # global generator: both seeded (the caller's global states change)
        random.seed(seed)
        np.random.seed(seed)
        scheduler = tune.schedulers.PopulationBasedTraining(
            time_attr="training_iteration", metric="val_bpb", mode="min", perturbation_interval=1,
            hyperparam_mutations={"genome": _mutations(setup.space, genes)})
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, model=setup.model, train=train, data=setup.data, seed=seed,
                                 total=total_steps, interval=interval), {"cpu": cpus / slots if slots else 1})
        tuner = tune.Tuner(
            trainable,
            param_space={"genome": tune.grid_search([dict(g) for g in genomes])},
            tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True, time_budget_s=wall_budget_s),
            run_config=tune.RunConfig(name=f"pbt-seed{seed}", storage_path=os.path.abspath(workdir),
                                      stop={"training_iteration": math.ceil(total_steps / interval)},
                                      callbacks=[Curve()], verbose=0))
        results = tuner.fit()
        if results.errors:
            raise RuntimeError(f"Tune PBT: {len(results.errors)} trial(s) failed: "
                               f"{str(results.errors[0]).strip().splitlines()[-1]}")
    finally:
        cluster.close()
    return {"best_val_bpb": tally["best"], "wall_s": time.time() - started, "curve": curve,
            "steps": tally["steps"], "restores": tally["restores"], "exploits": tally["exploits"],
            "final_steps": [tally["final"].get(i) for i in range(len(genomes))]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=4, help="trials (members)")
    p.add_argument("--total-steps", type=int, default=400, help="optimizer steps per trial")
    p.add_argument("--interval", type=int, default=50, help="steps between reports (the perturbation interval)")
    p.add_argument("--wall-budget", type=float, default=None, help="Tune's time_budget_s (seconds)")
    p.add_argument("--slots", type=int, default=None, help="trials at once (default: Ray's CPUs, 1 CPU each)")
    p.add_argument("--small", action="store_true",
                   help="the smoke test: 2 trials x 2 intervals of 4 steps, a tiny model, one trial at a time")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    p.add_argument("--pool", action="store_true",
                   help="also time bench/startup.py's plain 2-process pool right before and after this arm "
                        "(run as its own process) and print the whole-process ratio")
    args = p.parse_args(argv)
    if args.small:
        args.size, args.total_steps, args.interval = 2, 8, 4
        args.slots = args.slots or 1
        args.set = [*SMALL, *args.set]
    if args.pool:
        return pool_ratio(args, [a for a in (sys.argv[1:] if argv is None else argv) if a != "--pool"])
    import numpy as np

    from experiments.config import build_setup, load_config

    setup = build_setup(load_config(QUICKSTART, [f"seed={args.seed}", *args.set]))
    rng = np.random.default_rng([setup.seed, 0])   # the genomes evo's run samples (population/records.py)
    genomes = [setup.space.sample(rng).as_dict() for _ in range(args.size)]
    workdir = tempfile.mkdtemp(prefix="evo-bench-tune-")
    try:
        out = run_tune_pbt(genomes=genomes, setup=setup, seed=args.seed, total_steps=args.total_steps,
                           interval=args.interval, wall_budget_s=args.wall_budget, workdir=workdir,
                           slots=args.slots)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"Ray Tune PBT, seed {args.seed}: {args.size} trials x {args.total_steps} steps, interval "
          f"{args.interval}: best val_bpb {out['best_val_bpb']:.4f}, wall {out['wall_s']:.1f} s, "
          f"{out['steps']} steps trained, {out['restores']} restores ({out['exploits']} exploits)")
    print(json.dumps({"workload": {"seed": args.seed, "size": args.size, "total_steps": args.total_steps,
                                   "interval": args.interval, "set": args.set}, "genomes": genomes, **out}))
    return 0


def pool_ratio(args: argparse.Namespace, argv: list[str]) -> int:
    """Launch to exit of this arm as its own process, divided by the mean of a plain 2-process
    pool (bench/startup.py: same Trainer, genomes, seeds, steps and evaluations; no Ray, no
    exploits) measured right before and right after it."""
    import subprocess

    from startup import pool_run   # bench/ is on sys.path when this file runs

    workload = argparse.Namespace(size=args.size, total_steps=args.total_steps, interval=args.interval,
                                  mode="sync", set=[f"seed={args.seed}", *args.set])
    before = pool_run(workload)
    launch = time.time()
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                         cwd=ROOT)
    whole = time.time() - launch
    if out.returncode != 0:
        raise SystemExit(f"Tune PBT arm failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    after = pool_run(workload)
    tune_out = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = whole / ((before["whole_s"] + after["whole_s"]) / 2)
    print(out.stdout.strip().splitlines()[-2])
    print(f"plain pool before {before['whole_s']:.1f} s, Tune PBT whole process {whole:.1f} s, plain pool after "
          f"{after['whole_s']:.1f} s: whole process / plain pool (mean) {ratio:.3f}")
    print(json.dumps({**tune_out, "whole_s": whole, "pool_before": before, "pool_after": after,
                      "whole_over_pool": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
