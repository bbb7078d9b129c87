"""The evolved data mix against fixed mixes, judged on held-out documentation (issue 17).

Every arm is `experiments/data_mix.yaml` (tiny InternLM2, sources code = stdlib and docs =
stdlib-docs, population 4 under pbt, members judged on the docs source's held-out split only, so
val_bpb is val_bpb.docs) run by `evo run` with the same seed, population, model and total
optimizer steps:

- evolved: the shipped search: genes data.mix.code in [0, 1] and data.mix.docs in [0.05, 1] (a docs
  share of 5-100 %) and train.lr;
- fixed P %: the mix genes dropped and data.mix set to {code: 1 - P/100, docs: P/100}; lr is still
  searched by pbt, so only the mix differs.

It prints each arm's best held-out docs bits/byte per seed, mean +- std, and the evolved arm's
ratio to each fixed arm (the baseline is measured in the same invocation; < 1 means the evolved
mix is better), writes data_mix.json and a plot: the best final member's docs share over
optimizer steps for each evolved seed (its schedule, inherited through its exploits), and
the arms' bits/byte.

    .venv/bin/python bench/data_mix.py                       # 3 seeds x 6 arms, 300 steps each
    .venv/bin/python bench/data_mix.py --small               # smoke setting (the test suite)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
CONFIG = REPO / "experiments" / "data_mix.yaml"
FIXED = (0, 25, 50, 75, 100)
SMALL = dict(seeds=1, fixed=(0, 100), total_steps=20, interval_steps=10, size=2)
# the smoke setting's model and data: the code paths of the full one at a fraction of its compute
SMALL_SET = ["data.seq_len=32", "data.max_bytes=100000", "data.eval_batches=2", "data.eval_batch_size=4",
             "train.batch_size=4", "train.warmup_steps=2", "model.hidden_size=32", "model.num_hidden_layers=1",
             "model.intermediate_size=64"]


def arm_overrides(arm: str) -> list[str]:
    """--set values for one arm: 'evolved' or a fixed docs percentage."""
    if arm == "evolved":
        return []
    p = int(arm) / 100
    return ["search.data.mix.code=null", "search.data.mix.docs=null", f"data.mix={{code: {1 - p}, docs: {p}}}"]


def run_arm(arm: str, seed: int, storage: Path, args: argparse.Namespace) -> dict:
    name = f"{'evolved' if arm == 'evolved' else 'fixed' + arm}-s{seed}"
    cmd = [sys.executable, "-m", "experiments", "run", str(CONFIG), "--storage", str(storage), "--name", name,
           "--set", f"seed={seed}", "--set", f"population.total_steps={args.total_steps}",
           "--set", f"population.interval_steps={args.interval_steps}", "--set", f"population.size={args.size}",
           "--set", "logging.wandb.mode=disabled", "--set", "logging.optuna=false"]
    for s in [*arm_overrides(arm), *args.set]:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"data_mix: arm {arm} seed {seed} failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip().splitlines()[-1:] or proc.stdout[-500:]}")
    run = storage / name
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best"]
    return {"arm": arm, "seed": seed, "val_bpb_docs": best["val_bpb"], "member": best["member"],
            "step": best["step"], "wall_s": wall,
            "schedule": docs_schedule(storage, name) if arm == "evolved" else None}


def docs_schedule(storage: Path, name: str) -> list[tuple[int, float]]:
    """The best final member's docs share at each step of its schedule (the genes its weights
    were trained with, inherited through every exploit), as the run's report plots it."""
    from population.report import load_run, mix_schedule

    return [(step, shares["docs"]) for step, shares in mix_schedule(load_run(str(storage), name))]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(rows: list[dict], arms: list[str], seeds: list[int]) -> tuple[str, dict]:
    by = {(r["arm"], r["seed"]): r["val_bpb_docs"] for r in rows}
    stats = {arm: mean_std([by[arm, s] for s in seeds]) for arm in arms}
    evolved = stats["evolved"][0]
    lines = ["arm        " + " ".join(f"seed{s:<6}" for s in seeds) + "  mean     std      evolved/arm"]
    for arm in arms:
        label = "evolved" if arm == "evolved" else f"fixed {arm}%"
        m, sd = stats[arm]
        lines.append(f"{label:<10} " + " ".join(f"{by[arm, s]:<10.4f}" for s in seeds)
                     + f"  {m:<8.4f} {sd:<8.4f} {evolved / m:.4f}")
    fixed = [a for a in arms if a != "evolved"]
    best_fixed = min(fixed, key=lambda a: stats[a][0])
    met = all(evolved < stats[a][0] for a in fixed)
    lines.append(f"best fixed: {best_fixed}% docs ({stats[best_fixed][0]:.4f}); evolved {evolved:.4f}; "
                 f"ratio {evolved / stats[best_fixed][0]:.4f}; goal (evolved beats every fixed mix): "
                 f"{'met' if met else 'not met'}")
    return "\n".join(lines), {"stats": stats, "best_fixed": best_fixed, "goal_met": met}


def plot(rows: list[dict], arms: list[str], stats: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if r["schedule"]:
            steps = [s for s, _ in r["schedule"]]   # the last point is the member's current step
            shares = [x for _, x in r["schedule"]]
            a.step(steps, shares, where="post", label=f"seed {r['seed']}")
    a.set_xlabel("optimizer step")
    a.set_ylabel("docs share of the batches")
    a.set_ylim(0, 1)
    a.set_title("evolved: best final member's docs share")
    a.legend()
    xs = range(len(arms))
    b.errorbar(xs, [stats[x][0] for x in arms], yerr=[stats[x][1] for x in arms], fmt="o", capsize=4)
    b.set_xticks(list(xs), ["evolved" if x == "evolved" else f"{x}%" for x in arms])
    b.set_xlabel("arm (fixed: docs share)")
    b.set_ylabel("best held-out docs bits/byte (mean +- std)")
    b.set_title("judged on held-out documentation")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--total-steps", type=int, default=300)
    ap.add_argument("--interval-steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=4)
    ap.add_argument("--small", action="store_true",
                    help="smoke setting: 1 seed, evolved vs 0 %% and 100 %%, 20 steps, a tiny model on 100 kB")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "figures")
    ap.add_argument("--storage", type=Path, default=None, help="run store root (default: a temporary folder)")
    args = ap.parse_args(argv)
    args.set = SMALL_SET if args.small else []
    fixed = FIXED
    if args.small:
        args.seeds, args.total_steps, args.interval_steps, args.size = (
            SMALL["seeds"], SMALL["total_steps"], SMALL["interval_steps"], SMALL["size"])
        fixed = SMALL["fixed"]
    arms = ["evolved"] + [str(p) for p in fixed]
    seeds = list(range(args.seeds))
    rows = []
    with tempfile.TemporaryDirectory(prefix="evo-data-mix-") as tmp:
        storage = args.storage or Path(tmp)
        for seed in seeds:
            for arm in arms:
                r = run_arm(arm, seed, storage, args)
                rows.append(r)
                print(f"  seed {seed} {arm:>7}: best docs bpb {r['val_bpb_docs']:.4f}  ({r['wall_s']:.0f} s, "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)
    text, summary = table(rows, arms, seeds)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_mix.json").write_text(json.dumps(
        {"arms": arms, "seeds": seeds, "total_steps": args.total_steps, "interval_steps": args.interval_steps,
         "size": args.size, "set": args.set, "rows": rows, "best_fixed": summary["best_fixed"], "goal_met": summary["goal_met"],
         "stats": {k: list(v) for k, v in summary["stats"].items()}}, indent=1))
    plot(rows, arms, summary["stats"], args.out / "data_mix.png")
    print(f"plot: {args.out / 'data_mix.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
