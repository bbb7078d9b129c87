"""Does searching the architecture beat training fixed shapes, at the same number of optimizer steps?

Three variants of `experiments/arch_search.yaml` (NSGA-II over val_bpb and parameters), per seed,
each the real driver on real member actors in one Ray session (a local one of its own, or the
cluster RAY_ADDRESS names):

- search:  the config as shipped: depth, width with heads (fixed head_dim), kv heads and FFN
           size are genes under the parameter budget, next to train.lr;
- base:    the same search with the architecture genes removed: every member keeps the base
           shape (`model:` of the config), only train.lr evolves;
- largest: likewise at the largest shape the search space allows under the budget (most
           parameters; found by enumerating the architecture genes' domains).

Every variant trains the same population for the same steps (population.size x total_steps
optimizer steps in all). Per seed it prints each variant's best val_bpb (the baseline is the best
fixed shape of the same seed, measured in the same run), and the Pareto front of the search's final
members (params, val_bpb) against each fixed shape: the search's best member with at most that
shape's parameter count, and whether it is better than the fixed shape's best member.

    nice -n 5 .venv/bin/python bench/arch_search.py                 # 3 seeds, the config as shipped
    .venv/bin/python bench/arch_search.py --small                   # the test suite's smoke setting
    .venv/bin/python bench/arch_search.py --seed-list 0 --variants search --set strategy.grow_only=false
                                                                    # screen a setting: one seed, one arm
    .venv/bin/python bench/arch_search.py --seed-list 0 1 2 3 --variants search --set population.start=base_and_largest
                                                                    # half the members start at the largest shape

Writes arch_search.runs.jsonl (one line per finished search, as it ends), arch_search.json and
arch_search.png (val_bpb against parameters) to --out. `--combine` runs nothing and makes the
tables and the plot from runs.jsonl files of earlier runs (the search and the fixed shapes run as
two commands side by side, as in BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from evo.genome import ARCHITECTURE_PREFIX, Genome  # noqa: E402
from experiments.config import SEARCH_CONSTRAINTS, build_setup, load_config  # noqa: E402
from population.cluster import connect  # noqa: E402
from population.driver import run_search  # noqa: E402
from population.inspect import run_status  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "arch_search.yaml"
VARIANTS = ("search", "base", "largest")
SMALL = [
    "population.size=3", "population.total_steps=4", "population.interval_steps=2",
    "data.seq_len=32", "data.max_bytes=100000", "data.eval_batches=2", "data.eval_batch_size=4",
    "train.batch_size=4",
]


class Quiet:
    """The driver's console: keeps nothing, prints nothing (the table is this script's output)."""

    is_terminal = False

    def print(self, *_: object, **__: object) -> None:
        pass


def variant_overrides(variant: str, arch_paths: list[str], largest: dict) -> list[str]:
    if variant == "search":
        return []
    out = [f"search.{p}=null" for p in arch_paths] + [f"search.{k}=null" for k in SEARCH_CONSTRAINTS]
    if variant == "largest":
        out += [f"{p}={v}" for p, v in largest.items()]
    return out


def pareto(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The non-dominated (params, val_bpb) points, both minimised, by params."""
    front = []
    for n, b in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or b < front[-1][1]:
            front.append((n, b))
    return front


def run_one(overrides: list[str], name: str, storage: str, seed: int) -> dict:
    """One search to its end; its best val_bpb, final members (params, val_bpb, genome) and steps."""
    cfg = load_config(CONFIG, [*overrides, f"seed={seed}", "logging.wandb.mode=disabled", "logging.optuna=false"],
                      strings={"storage": storage, "name": name})
    setup = build_setup(cfg)
    summary = run_search(setup, console=Quiet())
    assert summary["status"] == "finished", summary
    status = run_status(storage, name)
    alive = [m for m in status["members"] if m["alive"]]
    members = [{"params": setup.space.count_parameters(Genome.from_dict(m["genome"])), "val_bpb": m["val_bpb"],
                "genome": m["genome"]} for m in alive]
    return {"best_val_bpb": status["best"]["val_bpb"], "members": members,
            "steps": sum(m["step"] for m in alive), "size": cfg.population.size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="the test suite's smoke setting (1 seed, 4 steps)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--seed-list", type=int, nargs="+", metavar="SEED",
                    help="run these seeds instead of 0 .. --seeds - 1 (e.g. --seed-list 0 to screen a setting)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="run only these variants (screening; the tables need all three)")
    ap.add_argument("--combine", type=Path, nargs="+", metavar="JSONL",
                    help="run nothing: the tables and the plot from arch_search.runs.jsonl files of earlier runs "
                         "(e.g. the search and the fixed shapes run as two commands)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "figures")
    args = ap.parse_args()
    base_overrides = [*(SMALL if args.small else []), *args.set]
    seed_list = [0] if args.small else (args.seed_list or list(range(args.seeds)))
    seeds = len(seed_list)
    space = build_setup(load_config(CONFIG, base_overrides)).space
    arch_paths = [p for p in space.paths if p.startswith(ARCHITECTURE_PREFIX)]
    largest = space.largest_shape()   # evo/space.py: the most parameters the space allows
    cfg0 = load_config(CONFIG, base_overrides)
    runs: list[dict] = []
    if args.combine:   # the seeds the combined runs hold, not the ones this command would run
        for path in args.combine:
            runs += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        seed_list = sorted({r["seed"] for r in runs})
    print(f"workload: {CONFIG.name}, {cfg0.population.size} members x {cfg0.population.total_steps} steps, "
          f"interval {cfg0.population.interval_steps}, start {cfg0.population.start}, strategy "
          f"{cfg0.strategy.name} {list(cfg0.strategy.objectives)} (grace {cfg0.strategy.grace}, {cfg0.strategy.grace_intervals} "
          f"intervals), seeds {seed_list}; budget {space.max_params} params")
    print("largest shape: " + ", ".join(f"{p[len(ARCHITECTURE_PREFIX):]}={v}" for p, v in largest.items()))

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "arch_search.runs.jsonl"    # one line per finished search, written as it ends
    if not args.combine:
        log.write_text("")
        # the cluster RAY_ADDRESS names, else a private local Ray (never one a `ray start` left behind)
        os.environ["RAY_ADDRESS"] = os.environ.get("RAY_ADDRESS") or "local"
        cluster = connect(Quiet())
        try:
            with tempfile.TemporaryDirectory(prefix="evo-arch-bench-") as tmp:
                for variant in args.variants:
                    for seed in seed_list:
                        r = run_one([*base_overrides, *variant_overrides(variant, arch_paths, largest)],
                                    f"{variant}-s{seed}", str(Path(tmp) / "runs"), seed)
                        runs.append({"variant": variant, "seed": seed, **r})
                        with log.open("a") as f:
                            f.write(json.dumps(runs[-1]) + "\n")
        finally:
            cluster.close()
    by = {(r["variant"], r["seed"]): r for r in runs}
    variants = [v for v in VARIANTS if any(k[0] == v for k in by)]
    seed_list = sorted({k[1] for k in by})
    seeds = len(seed_list)

    if set(variants) != set(VARIANTS) or len(by) != len(VARIANTS) * seeds:
        for (v, seed), r in sorted(by.items()):
            best = min(r["members"], key=lambda m: m["val_bpb"])
            print(f"{v} seed {seed}: best val_bpb {r['best_val_bpb']:.4f} ({best['params']} params, {best['genome']}), "
                  f"steps {r['steps']}")
        return
    results = {v: [by[v, seed] for seed in seed_list] for v in VARIANTS}
    print(f"{'variant':8s} {'seed':>4s} {'best_val_bpb':>12s} {'params_best':>11s} {'steps':>6s} {'vs_best_fixed':>13s}")
    for seed in range(seeds):
        fixed_best = min(results[v][seed]["best_val_bpb"] for v in ("base", "largest"))
        for v in VARIANTS:
            r = results[v][seed]
            best = min(r["members"], key=lambda m: m["val_bpb"])
            print(f"{v:8s} {seed_list[seed]:4d} {r['best_val_bpb']:12.4f} {best['params']:11d} {r['steps']:6d} "
                  f"{r['best_val_bpb'] / fixed_best:13.4f}")
    means = {v: statistics.mean(r["best_val_bpb"] for r in results[v]) for v in VARIANTS}
    spread = {v: statistics.stdev(r["best_val_bpb"] for r in results[v]) if seeds > 1 else 0.0 for v in VARIANTS}
    print("mean ± std best val_bpb: " + ", ".join(f"{v} {means[v]:.4f} ± {spread[v]:.4f}" for v in VARIANTS))
    for v in ("base", "largest"):   # paired by seed: the same first lr draws on both sides
        diff = [results["search"][s]["best_val_bpb"] - results[v][s]["best_val_bpb"] for s in range(seeds)]
        se = statistics.stdev(diff) / math.sqrt(seeds) if seeds > 1 else float("nan")
        print(f"search - {v}, paired by seed: mean {statistics.mean(diff):+.4f} ± {se:.4f} (standard error), "
              f"search lower in {sum(d < 0 for d in diff)} of {seeds} seeds")
    wins = sum(results["search"][s]["best_val_bpb"] < min(results[v][s]["best_val_bpb"] for v in ("base", "largest"))
               for s in range(seeds))
    print(f"search beats every fixed shape (best val_bpb, same seed): {wins} of {seeds} seeds")
    print("front vs fixed shapes: the search's best member with at most the fixed shape's parameters")
    print(f"{'fixed':8s} {'seed':>4s} {'params':>8s} {'fixed_bpb':>9s} {'search_bpb':>10s} {'search_params':>13s} {'beats':>5s}")
    front_wins = {v: 0 for v in ("base", "largest")}
    for seed in range(seeds):
        points = [(m["params"], m["val_bpb"]) for m in results["search"][seed]["members"]]
        for v in ("base", "largest"):
            r = results[v][seed]
            n = r["members"][0]["params"]
            under = [p for p in points if p[0] <= n]
            s_n, s_b = min(under, key=lambda p: p[1]) if under else (0, float("nan"))
            beats = bool(under) and s_b < r["best_val_bpb"]
            front_wins[v] += beats
            print(f"{v:8s} {seed_list[seed]:4d} {n:8d} {r['best_val_bpb']:9.4f} {s_b:10.4f} {s_n:13d} {'yes' if beats else 'no':>5s}")
    print("front beats the fixed shape: " + ", ".join(f"{v} {front_wins[v]} of {seeds}" for v in front_wins))

    (args.out / "arch_search.json").write_text(json.dumps(
        {"largest": largest, "budget": space.max_params, "seeds": seed_list, "results": results}, indent=1))
    plot(results, args.out / "arch_search.png", seed_list)
    print(f"plot: {args.out / 'arch_search.png'}")


def plot(results: dict[str, list[dict]], path: Path, seed_list: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, by_seed) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    colours = {"search": "tab:blue", "base": "tab:orange", "largest": "tab:green"}
    for v, runs in results.items():
        for seed, r in enumerate(runs):
            pts = [(m["params"], m["val_bpb"]) for m in r["members"]]
            ax.scatter(*zip(*pts), s=14, alpha=0.5, color=colours[v], label=f"{v} (final members)" if seed == 0 else None)
            if v == "search":
                front = pareto(pts)
                ax.step(*zip(*front), where="post", color=colours[v], alpha=0.6, lw=1,
                        label="search Pareto front (per seed)" if seed == 0 else None)
        best = [r["best_val_bpb"] for r in runs]
        by_seed.plot(range(len(runs)), best, marker="o", color=colours[v], lw=1, alpha=0.8,
                     label=f"{v}: mean {sum(best) / len(best):.4f}")
    ax.set_xlabel("parameters")
    ax.set_ylabel("val bits/byte")
    ax.set_title("final members: searched shapes vs fixed shapes")
    ax.legend(fontsize=8)
    by_seed.set_xticks(range(len(seed_list)), [str(s) for s in seed_list])
    by_seed.set_xlabel("seed")
    by_seed.set_ylabel("best val bits/byte")
    by_seed.set_title("best member per seed (same optimizer steps)")
    by_seed.legend(fontsize=8)
    fig.suptitle("arch_search.yaml: the search against fixed shapes at equal optimizer steps", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
