"""Search quality against the peers, at equal compute and at equal wall time (issue 14, item 1).

The quickstart task (`experiments/quickstart.yaml`: tiny InternLM2 on the Python standard
library's source), the same `trainers.Trainer` for every method (one torch thread per member or
trial, as evo's members on this machine), and for a given seed the same initial genomes: those evo's
run samples (`np.random.default_rng([seed, 0])`, population/records.py), with the same trainer
seeds (`member_seed(seed, i)`). Methods:

- evo `pbt`, `pb2`, `ga` and `random`: real `evo run experiments/quickstart.yaml --set ...`
  processes (W&B disabled, Optuna mirroring off, a private run store). `random` is evo's random
  strategy (evo/random_search.py: every member kept as sampled, never exploited): the random
  search baseline, `size` independent trainings of the initial genomes for the whole budget.
- Ray Tune PBT: `bench/peer_tune.py`'s `run_tune_pbt` (evo's Trainer as a Tune function
  trainable), run in its own process.
- Optuna TPE + SuccessiveHalvingPruner (Optuna's defaults; TPE seeded with the seed): a trial
  trains the Trainer interval by interval, reports val_bpb after each and is pruned by successive
  halving; the first `size` trials are the initial genomes (`study.enqueue_trial`); 2 worker
  processes share a journal-file study; trials start until the total optimizer steps equal evo's
  (size x total_steps; the steps of pruned trials count, the last trial is cut at the budget).

Every method's result is the best validation bits/byte of any evaluation of any member or trial,
and its curve the best so far against the optimizer steps done by all members together and against
wall seconds since the method's process was launched (evo: the time its per-round progress line
was printed; its values from the members' histories in state.json). Wall is the whole process,
launch to exit (imports, Ray start and stop included).

Tables: (A) genes lr and weight decay (the depth gene removed: `search.model.num_hidden_layers=null`,
depth 2); (B) lr, weight decay and depth 1-3 (the peers keep a trial's depth for its whole life;
evo changes it live). Equal wall time: each peer gets the whole-process wall seconds evo `pbt`
needed for that seed (Optuna starts trials and intervals until the next interval would end past it;
Tune gets `wall_budget_s`), with no step budget.

    .venv/bin/python bench/peers.py --out /tmp/peers                 # table A, equal compute + equal wall, 3 seeds
    .venv/bin/python bench/peers.py --tables A B --out /tmp/peers    # both tables
    .venv/bin/python bench/peers.py --small --out /tmp/peers-small   # the smoke test's setting

Prints the tables; writes peers.json, peers_steps.png and peers_wall.png into --out (the JSON is
rewritten after every arm, so a long run that is stopped keeps what it measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
EVO_ARMS = ("pbt", "pb2", "ga", "random")
PEERS = ("tune_pbt", "optuna_tpe_sh")
LABELS = {"pbt": "evo pbt", "pb2": "evo pb2", "ga": "evo ga", "random": "evo random",
          "tune_pbt": "Ray Tune PBT", "optuna_tpe_sh": "Optuna TPE + SH"}
WORKERS = 2   # Optuna's worker processes: the 2 cores evo's members train on
TABLES = {"A": ["search.model.num_hidden_layers=null"], "B": []}
SMALL_SET = ["model.hidden_size=32", "model.intermediate_size=64", "data.max_bytes=400000", "data.seq_len=32",
             "data.val_fraction=0.2", "data.eval_batches=1", "data.eval_batch_size=4", "train.batch_size=4",
             "train.warmup_steps=2", "population.max_concurrent=2"]


def overrides(args: argparse.Namespace, table: str, seed: int) -> list[str]:
    """The --set values every method's config is built from (evo's run gets them all)."""
    return [f"seed={seed}", f"population.size={args.size}", f"population.total_steps={args.total_steps}",
            f"population.interval_steps={args.interval}", "population.mode=sync", "logging.optuna=false",
            "logging.wandb.mode=disabled", *TABLES[table], *args.set]


def load_setup(sets: list[str]):
    from experiments.config import build_setup, load_config

    return build_setup(load_config(QUICKSTART, sets))


def initial_genomes(setup, size: int) -> list[dict]:
    """The genomes evo's run starts from (population/records.py's _new_population)."""
    import numpy as np

    from population.records import plain

    rng = np.random.default_rng([setup.seed, 0])
    return [plain(setup.space.sample(rng).as_dict()) for _ in range(size)]


def curve_of(events: list[tuple[float, int, float]]) -> list[list[float]]:
    """[[steps so far, wall s, best so far]] from (wall s, steps of this evaluation, val_bpb) events."""
    out, steps, best = [], 0, math.inf
    for t, n, v in sorted(events):
        steps += n
        if math.isfinite(v):
            best = min(best, v)
        out.append([steps, t, best])
    return out


# -- evo ------------------------------------------------------------------------------------------


def run_evo(strategy: str, sets: list[str], storage: Path, name: str, tries: int = 3) -> dict:
    """One `evo run` process; its best val_bpb, wall (launch to exit) and curve. A run that fails
    before its first round (Ray not starting on an overloaded machine) is tried again afresh."""
    for attempt in range(1, tries + 1):
        try:
            return _run_evo(strategy, sets, storage, f"{name}-try{attempt}" if attempt > 1 else name)
        except _NoRound as e:
            if attempt == tries:
                raise SystemExit(str(e)) from None
            print(f"  {e}; trying again", flush=True)
    raise AssertionError("unreachable")


class _NoRound(Exception):
    """evo run failed before committing its first round."""


def _run_evo(strategy: str, sets: list[str], storage: Path, name: str) -> dict:
    cmd = [sys.executable, "-m", "experiments", "run", str(QUICKSTART), "--storage", str(storage),
           "--name", name, "--set", f"strategy.name={strategy}"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    launch = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    rounds: dict[int, float] = {}
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:   # one progress line per committed round (not a terminal), on stderr
        if line.startswith("round "):
            rounds[int(line.split()[1].split("/")[0])] = time.time() - launch
        tail = [*tail[-4:], line.rstrip()]
    rc = proc.wait()
    wall = time.time() - launch
    if rc != 0:
        why = f"peers: evo {strategy} ({name}) failed (exit {rc}): {tail}"
        raise _NoRound(why) if not rounds else SystemExit(why)
    from population.store import RunStore

    state = RunStore(str(storage), name).read_state()
    interval = int(state["interval_steps"])
    events = []
    first = {str(m["id"]): float(m["history"][0][1]) for m in state["members"] if m["history"]}
    for m in state["members"]:
        last = 0
        for step, val in m["history"]:   # sync: round r's evaluation is at step r x interval
            r = math.ceil(int(step) / interval)
            events.append((rounds.get(r, wall), max(int(step) - last, 0) or interval, float(val)))
            last = int(step)
    curve = curve_of(events)
    return {"best_val_bpb": curve[-1][2], "wall_s": wall, "curve": curve, "steps": curve[-1][0],
            "rounds_timed": len(rounds), "first_evaluations": first}


# -- Optuna TPE + successive halving (its own process: --optuna-child) ------------------------------


def _optuna_worker(params: dict, index: int, used, queue) -> None:
    """One of the study's worker processes: trials until the step budget or the wall budget ends."""
    import optuna

    from population.records import member_seed
    from startup import member_trainer   # bench/ is on sys.path
    from trainers.trainer import NonFiniteLossError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup = load_setup(params["sets"])
    train = dataclasses.replace(setup.train, decay_steps=setup.train.decay_steps or params["total_steps"])
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(params["journal"]))
    study = optuna.load_study(study_name="peers", storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=params["seed"] * 100 + index),
                              pruner=optuna.pruners.SuccessiveHalvingPruner())
    budget, deadline, interval = params["budget_steps"], params["deadline"], params["interval"]
    events: list[tuple[float, int, float]] = []
    first: dict[str, float] = {}   # the initial genomes' trials (0 .. size-1): their first val_bpb
    last_interval_s = [0.0]

    def take(n: int) -> int:
        """Steps granted for the next interval: 0 once the step or the wall budget is spent."""
        if deadline is not None and time.time() + last_interval_s[0] > deadline:
            return 0
        if budget is None:
            return n
        with used.get_lock():
            n = max(0, min(n, budget - used.value))
            used.value += n
        return n

    def objective(trial: optuna.Trial) -> float:
        genome = {}
        for gene in setup.space.genes:
            d = gene.to_optuna()
            if isinstance(d, optuna.distributions.FloatDistribution):
                genome[gene.path] = trial.suggest_float(gene.path, d.low, d.high, log=d.log, step=d.step)
            elif isinstance(d, optuna.distributions.IntDistribution):
                genome[gene.path] = trial.suggest_int(gene.path, d.low, d.high, log=d.log, step=d.step)
            else:
                genome[gene.path] = trial.suggest_categorical(gene.path, d.choices)
        trainer = member_trainer(setup.model, train, setup.data, genome, member_seed(setup.seed, trial.number))
        val = math.inf
        while trainer.step < params["total_steps"]:
            n = take(min(interval, params["total_steps"] - trainer.step))
            if n == 0:
                raise optuna.TrialPruned()   # the budget ran out: the trial ends where it is
            t0 = time.time()
            try:
                trainer.train(n)
            except NonFiniteLossError:
                events.append((time.time() - params["launch"], n, math.inf))
                raise optuna.TrialPruned() from None   # diverged: its steps count, it scores nothing
            val = float(trainer.evaluate()["val_bpb"])
            last_interval_s[0] = time.time() - t0
            events.append((time.time() - params["launch"], n, val))
            if trial.number < len(params["genomes"]):
                first.setdefault(str(trial.number), val)
            trial.report(val, trainer.step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return val

    def spent() -> bool:
        if deadline is not None and time.time() + last_interval_s[0] > deadline:
            return True
        return budget is not None and used.value >= budget

    while not spent():
        study.optimize(objective, n_trials=1)
    queue.put((events, first))


def optuna_child(params: dict) -> int:
    import multiprocessing

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup = load_setup(params["sets"])
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(params["journal"]))
    study = optuna.create_study(study_name="peers", storage=storage, direction="minimize")
    for genome in params["genomes"]:
        study.enqueue_trial(genome)
    assert [g.path for g in setup.space.genes] == sorted(params["genomes"][0])
    ctx = multiprocessing.get_context("spawn")
    used, queue = ctx.Value("q", 0), ctx.Queue()
    procs = [ctx.Process(target=_optuna_worker, args=(params, i, used, queue)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    got = [queue.get() for _ in procs]
    events = [e for ev, _ in got for e in ev]
    first = {k: v for _, f in got for k, v in f.items()}
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"optuna worker failed (exit {p.exitcode})")
    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    print(json.dumps({"events": events, "first": dict(sorted(first.items())), "trials": len(trials),
                      "states": {k: v for k, v in states.items() if v}}))
    return 0


def run_child(arm: str, params: dict, launch: float) -> tuple[dict, float]:
    """This script again as ``--<arm>-child PARAMS`` (an arm in its own process): the JSON of the
    child's last output line and the wall seconds since ``launch``; a failed child ends the run
    with its last lines."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--{arm}-child", json.dumps(params)],
                         capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - launch
    if out.returncode != 0:
        raise SystemExit(f"peers: {arm} arm failed ({out.returncode}): {out.stderr.strip().splitlines()[-3:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def run_optuna(sets: list[str], genomes: list[dict], seed: int, args: argparse.Namespace, workdir: Path,
               wall_budget_s: float | None) -> dict:
    launch = time.time()
    params = {"sets": sets, "genomes": genomes, "seed": seed, "total_steps": args.total_steps,
              "interval": args.interval, "launch": launch, "journal": str(workdir / f"optuna-{launch}.journal"),
              "budget_steps": None if wall_budget_s is not None else args.size * args.total_steps,
              "deadline": None if wall_budget_s is None else launch + wall_budget_s}
    child, wall = run_child("optuna", params, launch)
    curve = curve_of([tuple(e) for e in child["events"]])
    return {"best_val_bpb": curve[-1][2], "wall_s": wall, "curve": curve, "steps": curve[-1][0],
            "trials": child["trials"], "trial_states": child["states"], "first_evaluations": child["first"]}


# -- Ray Tune PBT (bench/peer_tune.py, in its own process: --tune-child) ----------------------------


def tune_available() -> bool:
    return (Path(__file__).resolve().parent / "peer_tune.py").exists()


def tune_child(params: dict) -> int:
    from peer_tune import run_tune_pbt   # bench/ is on sys.path

    setup = load_setup(params["sets"])
    start = time.time()
    res = run_tune_pbt(genomes=params["genomes"], setup=setup, seed=params["seed"], total_steps=params["total_steps"],
                       interval=params["interval"], wall_budget_s=params["wall_budget_s"], workdir=params["workdir"])
    shift = start - params["launch"]   # the curve's clock from the process's launch, as every arm's
    print(json.dumps({"best_val_bpb": res["best_val_bpb"],
                      "curve": [[s, t + shift, b] for s, t, b in res["curve"]]}))
    return 0


def run_tune(sets: list[str], genomes: list[dict], seed: int, args: argparse.Namespace, workdir: Path,
             wall_budget_s: float | None) -> dict:
    launch = time.time()
    sub = workdir / f"tune-{launch}"
    sub.mkdir()
    params = {"sets": sets, "genomes": genomes, "seed": seed, "total_steps": args.total_steps,
              "interval": args.interval, "launch": launch, "wall_budget_s": wall_budget_s, "workdir": str(sub)}
    child, wall = run_child("tune", params, launch)
    curve = child["curve"]
    return {"best_val_bpb": float(child["best_val_bpb"]), "wall_s": wall, "curve": curve,
            "steps": curve[-1][0] if curve else 0}


# -- the tables -----------------------------------------------------------------------------------


def reused(prior: dict, table: str, setting: str, method: str, seed: int) -> dict | None:
    """An arm of a --reuse peers.json, or None."""
    return prior.get(table, {}).get("arms", {}).get(setting, {}).get(method, {}).get(str(seed))


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table_text(title: str, arms: dict, methods: list[str], seeds: list[int]) -> str:
    lines = [title, f"{'method':<16} " + " ".join(f"{'seed ' + str(s):>8}" for s in seeds)
             + f" {'mean':>8} {'std':>7} {'wall s':>8} {'steps':>7} {'mean/pbt':>8}"]
    ref = statistics.fmean(arms["pbt"][s]["best_val_bpb"] for s in seeds) if "pbt" in arms else math.nan
    for m in methods:
        runs = [arms[m][s] for s in seeds]
        mean, std = mean_std([r["best_val_bpb"] for r in runs])
        lines.append(f"{LABELS[m]:<16} " + " ".join(f"{r['best_val_bpb']:8.4f}" for r in runs)
                     + f" {mean:8.4f} {std:7.4f} {statistics.fmean(r['wall_s'] for r in runs):8.1f}"
                     f" {statistics.fmean(r['steps'] for r in runs):7.0f} {mean / ref:8.4f}")
    return "\n".join(lines)


def summarize(arms: dict, seeds: list[int]) -> dict:
    out = {}
    for m, by_seed in arms.items():
        done = [s for s in seeds if s in by_seed]
        if done:
            mean, std = mean_std([by_seed[s]["best_val_bpb"] for s in done])
            out[m] = {"seeds": done, "mean": mean, "std": std,
                      "wall_s_mean": statistics.fmean(by_seed[s]["wall_s"] for s in done),
                      "steps_mean": statistics.fmean(by_seed[s]["steps"] for s in done)}
    return out


def goals(results: dict) -> list[str]:
    """The issue's goals, each with what was measured."""
    lines = []
    for table, res in results.items():
        ec = res["summary"]["equal_compute"]
        if not all(m in ec for m in ("pbt", "pb2", "ga", "random")):
            continue
        best_evo = min(("pbt", "pb2", "ga"), key=lambda m: ec[m]["mean"])
        peers = [m for m in ("tune_pbt", "optuna_tpe_sh", "random") if m in ec]
        beat = all(ec[best_evo]["mean"] < ec[p]["mean"] for p in peers)
        listed = ", ".join(f"{LABELS[p]} {ec[p]['mean']:.4f}" for p in peers)
        lines.append(f"table {table}: evo's best ({LABELS[best_evo]} {ec[best_evo]['mean']:.4f}) beats every peer's mean "
                     f"at equal compute ({listed}): "
                     f"{'met' if beat else 'not met'}")
        worse = [m for m in ("pbt", "pb2", "ga") if not ec[m]["mean"] < ec["random"]["mean"]]
        lines.append(f"table {table}: every evo strategy beats random at equal compute: "
                     f"{'met' if not worse else 'not met (' + ', '.join(LABELS[m] for m in worse) + ')'}")
        ew = res["summary"].get("equal_wall", {})
        peers_w = [m for m in PEERS if m in ew]
        if peers_w and "pbt" in ew:
            margin_c = min(ec[p]["mean"] for p in peers_w if p in ec) - ec["pbt"]["mean"]
            margin_w = min(ew[p]["mean"] for p in peers_w) - ew["pbt"]["mean"]
            lines.append(f"table {table}: evo pbt's margin over the best peer, equal compute {margin_c:+.4f}, "
                         f"equal wall {margin_w:+.4f}: {'met' if margin_w > margin_c and margin_w > 0 else 'not met'}"
                         " (goal: larger at equal wall)")
    return lines


def grid_mean(curves: list[list[list[float]]], x: int, xs: list[float]) -> list[float]:
    """The mean over seeds of the best-so-far step functions at xs (nan before every seed has a point)."""
    out = []
    for v in xs:
        vals = []
        for c in curves:
            pts = [p[2] for p in c if p[x] <= v and math.isfinite(p[2])]
            vals.append(pts[-1] if pts else math.nan)
        out.append(statistics.fmean(vals) if all(math.isfinite(a) for a in vals) else math.nan)
    return out


def plot(results: dict, out: Path, x: int, name: str, xlabel: str, settings: tuple[str, ...]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, s) for t in results for s in settings if results[t]["arms"].get(s)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (table, setting) in zip(axes[0], panels):
        for m, by_seed in results[table]["arms"][setting].items():
            curves = [c["curve"] for c in by_seed.values() if c["curve"]]
            if not curves:
                continue
            xs = sorted({p[x] for c in curves for p in c})   # every seed's evaluations
            ax.plot(xs, grid_mean(curves, x, xs), label=LABELS[m], drawstyle="steps-post", marker="o", markersize=3)
        genes = "lr, weight decay" + (", depth" if table == "B" else "")
        ax.set_title(f"table {table} ({genes}): {setting.replace('_', ' ')}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("best val bits/byte so far (mean over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--optuna-child"]:
        return optuna_child(json.loads(argv[1]))
    if argv[:1] == ["--tune-child"]:
        return tune_child(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=4)
    p.add_argument("--total-steps", type=int, default=400)
    p.add_argument("--interval", type=int, default=50)
    p.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=["A"])
    p.add_argument("--no-equal-wall", dest="equal_wall", action="store_false", help="equal compute only")
    p.add_argument("--small", action="store_true",
                   help="the smoke test: 2 members x 8 steps, a tiny model, 1 seed, table A, equal compute and "
                        "equal wall (unless --no-equal-wall), 2 methods at once")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods run at once at equal compute, and peers at equal wall (1 for published figures: "
                        "they share the cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override")
    p.add_argument("--out", type=Path, default=Path("peers-out"))
    p.add_argument("--reuse", type=Path, default=None, metavar="PEERS_JSON",
                   help="take the arms an earlier peers.json of the same workload measured, run only the others "
                        "(e.g. the Tune arm added later; its equal-wall budget is evo pbt's wall from that file)")
    args = p.parse_args(argv)
    if args.small:
        args.seeds, args.size, args.total_steps, args.interval, args.tables = [0], 2, 8, 4, ["A"]
        args.jobs = 2   # two methods (at equal wall: both peers) at once: the smoke test times nothing
        args.set = [*SMALL_SET, *args.set]
    methods = list(EVO_ARMS) + [m for m in PEERS if m != "tune_pbt" or tune_available()]
    if not tune_available():
        print("tune arm: bench/peer_tune.py missing", flush=True)
    workload = {"size": args.size, "total_steps": args.total_steps, "interval": args.interval, "seeds": args.seeds,
                "tables": args.tables, "set": args.set, "cpus": os.cpu_count(), "optuna_workers": WORKERS}
    prior = {}
    if args.reuse is not None:
        try:
            old = json.loads(args.reuse.read_text())
        except (OSError, ValueError) as e:
            print(f"peers: --reuse {args.reuse}: {e}", file=sys.stderr)
            return 2
        same = ("size", "total_steps", "interval", "set")
        if any(old["workload"].get(k) != workload[k] for k in same):
            print(f"peers: --reuse {args.reuse}: another workload ({', '.join(same)} differ)", file=sys.stderr)
            return 2
        prior = old["tables"]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="evo-bench-peers-"))
    results: dict = {}

    def save() -> None:
        for res in results.values():
            res["summary"] = {k: summarize(v, args.seeds) for k, v in res["arms"].items()}
        (args.out / "peers.json").write_text(json.dumps({"workload": workload, "tables": results,
                                                         "goals": goals(results)}, indent=1))

    def report(table: str, seed: int, m: str, r: dict, how: str) -> None:
        print(f"  table {table} seed {seed} {LABELS[m]:<16} {how}best {r['best_val_bpb']:.4f}  wall {r['wall_s']:6.1f} s"
              f"  steps {r['steps']}  (load {os.getloadavg()[0]:.1f})", flush=True)
        save()

    try:
        for table in args.tables:
            arms: dict = {"equal_compute": {m: {} for m in methods}}
            if args.equal_wall:
                arms["equal_wall"] = {m: {} for m in ["pbt", *methods[len(EVO_ARMS):]]}
            results[table] = {"arms": arms}
            for seed in args.seeds:
                sets = overrides(args, table, seed)
                genomes = initial_genomes(load_setup(sets), args.size)

                def arm(m: str) -> dict:
                    if m in EVO_ARMS:
                        return run_evo(m, sets, work, f"{table}-{m}-s{seed}")
                    run = run_optuna if m == "optuna_tpe_sh" else run_tune
                    return run(sets, genomes, seed, args, work, None)

                todo = []
                for m in methods:
                    if (r := reused(prior, table, "equal_compute", m, seed)) is not None:
                        arms["equal_compute"][m][seed] = r
                        report(table, seed, m, r, "(reused) ")
                    else:
                        todo.append(m)
                with ThreadPoolExecutor(args.jobs) as pool:   # --jobs 1: one method at a time
                    for m, r in zip(todo, pool.map(arm, todo)):
                        arms["equal_compute"][m][seed] = r
                        report(table, seed, m, r, "")
                if args.equal_wall:
                    budget = arms["equal_compute"]["pbt"][seed]["wall_s"]
                    arms["equal_wall"]["pbt"][seed] = arms["equal_compute"]["pbt"][seed]
                    how = f"equal wall ({budget:.0f} s): "
                    todo = []
                    for m in methods[len(EVO_ARMS):]:
                        if (r := reused(prior, table, "equal_wall", m, seed)) is not None:
                            arms["equal_wall"][m][seed] = r
                            report(table, seed, m, r, how + "(reused) ")
                        else:
                            todo.append(m)

                    def peer_at_wall(m: str) -> dict:
                        run = run_optuna if m == "optuna_tpe_sh" else run_tune
                        return dict(run(sets, genomes, seed, args, work, budget), wall_budget_s=budget)

                    with ThreadPoolExecutor(args.jobs) as pool:   # --jobs 1: one peer at a time
                        for m, r in zip(todo, pool.map(peer_at_wall, todo)):
                            arms["equal_wall"][m][seed] = r
                            report(table, seed, m, r, how)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"workload: quickstart, {args.size} members x {args.total_steps} steps (interval {args.interval}), "
          f"seeds {' '.join(map(str, args.seeds))}; Optuna: {WORKERS} worker processes; {os.cpu_count()} CPUs")
    for table in args.tables:
        genes = "lr, weight decay" + (", depth" if table == "B" else "")
        arms = results[table]["arms"]
        print(table_text(f"table {table} ({genes}), equal compute: {args.size * args.total_steps} optimizer "
                         "steps per method", arms["equal_compute"], methods, args.seeds))
        if "equal_wall" in arms:
            print(table_text(f"table {table} ({genes}), equal wall time: each peer gets evo pbt's wall seconds",
                             arms["equal_wall"], list(arms["equal_wall"]), args.seeds))
    save()
    for line in goals(results):
        print(line)
    plots = [plot(results, args.out, 0, "peers_steps.png", "optimizer steps, all members together", ("equal_compute",)),
             plot(results, args.out, 1, "peers_wall.png", "wall seconds since launch",
                  ("equal_compute", "equal_wall") if args.equal_wall else ("equal_compute",))]
    print(f"json: {args.out / 'peers.json'}; plots: {' '.join(map(str, plots))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
