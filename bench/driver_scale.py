"""Scale of the driver: decision and bookkeeping time per round for populations of 16 to 4,096.

No Ray and no training: each round, stub results (the step, a val_bpb, the parameter count, a
throughput) stand for what the members would report, and the driver's own code does the rest,
on the quickstart's search space, in a temporary run store:

- decision  = ``Records.snapshot`` + ``strategy.plan`` (evo/ alone);
- bookkeeping = ``Records.record_results`` + the records' side of every applied decision
  (``records_before`` + ``record_applied``: schedule, lineage record) + ``set_checkpoints`` +
  ``Records.commit`` (lineage append, state.json commit, checkpoint pruning) + ``Monitor.on_round``
  (no sink enabled: W&B disabled, no Optuna mirror, no Ray) + ``Progress.update`` (the printed line)
  + ``settle_heap`` (the young garbage collected, the survivors frozen, as the driver does);
- prune CPU = the CPU of the thread that deletes, in the background, the checkpoint files no
  kept commit names any more (``RunStore.delete_cpu_s``): the driver's process pays it while
  the members train, off the round's path, so it is joined before the next round is timed and
  shown on its own, not in the total. Since the checkpoints go into slots overwritten in turn
  (``RunStore.checkpoint_slots``) there is nothing to delete and it reads 0; a tree that still
  names a new file per round (an older store) deletes 2 files per member per round here.

The members' own work is left out of the timing: between plan and commit the script writes each
member's (tiny) checkpoint and its ``.sha256``, as a member would, so the commit reads and prunes
real files. Each size runs ``--warmup`` untimed rounds (pb2's model needs observations), then
``--rounds`` timed ones; the table shows the median ms per round, in wall time and in CPU time of
the driver's process (``time.process_time``, its threads included: on a machine shared with
other work the wall clock also counts the time the process waited for a core), and, per strategy, the growth
exponent k of ms ∝ n^k fitted (least squares on log-log) over the sizes >= 256 (n log n from
1,024 to 4,096 is k ≈ 1.13; n² is 2). The plot (PNG) shows ms per round against n, log-log.

    .venv/bin/python bench/driver_scale.py                      # 16 .. 4096, pbt pb2 ga nsga2
    .venv/bin/python bench/driver_scale.py --small              # the test suite's smoke setting
    .venv/bin/python bench/driver_scale.py --sizes 1024 4096 --strategies nsga2

nsga2 runs on three objectives (val_bpb, params, tokens_per_s). "commit MB" is what the last
timed commit wrote: a delta of the commit before (the whole state is written every
``Records.chain``-th commit and at a session's first; see population/records.py).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from evo.genome import Genome  # noqa: E402
from evo.strategies import make_strategy  # noqa: E402
from evo.strategy import Crossover, Exploit, Keep, Strategy  # noqa: E402
from experiments.config import build_setup, load_config  # noqa: E402
from population.decisions import record_applied, records_before  # noqa: E402
from population.monitor import Monitor  # noqa: E402
from population.progress import Progress  # noqa: E402
from population.records import Records, settle_heap  # noqa: E402
from population.store import RunStore  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
STRATEGIES = ("pbt", "pb2", "ga", "nsga2")
SIZES = (16, 64, 256, 1024, 4096)
SMALL = dict(sizes=(16, 64), warmup=1, rounds=1)
INTERVAL = 10
FIT_FROM = 256   # the exponent is fitted over the sizes from here up


def setup_for(strategy: str, n: int, storage: str, rounds: int):
    overrides = [f"population.size={n}", f"strategy.name={strategy}", "logging.wandb.mode=disabled",
                 "logging.optuna=false", f"population.interval_steps={INTERVAL}",
                 f"population.total_steps={INTERVAL * (rounds + 1)}"]
    if strategy == "nsga2":
        overrides.append("strategy.objectives=[val_bpb, params, tokens_per_s]")
    cfg = load_config(QUICKSTART, overrides, strings={"storage": storage, "name": f"scale-{strategy}-{n}"})
    return build_setup(cfg)


class Console:
    """What Progress prints to when it is not a terminal (the lines are kept, not shown)."""

    is_terminal = False

    def __init__(self) -> None:
        self.out = io.StringIO()

    def print(self, text: str, **_: object) -> None:
        self.out.write(text + "\n")


def stub_results(records: Records, rng: np.random.Generator, params: dict) -> dict:
    """What each member would report after an interval: a val_bpb that falls with the step,
    noisy, plus its parameter count and a throughput."""
    out = {}
    for m in records.ids:
        rec = records[m]
        step = rec.step + INTERVAL
        out[m] = {"step": step, "val_bpb": float(2.0 + 2.0 / math.sqrt(step) + 0.05 * rng.standard_normal()),
                  "params": params[m], "tokens_per_s": float(rng.uniform(1e3, 1e4)), "seconds": 1.0,
                  "cpu_seconds": 1.0, "train_loss": 2.0, "val_loss": 1.5}
    return out


def write_checkpoints(store: RunStore, paths: dict) -> dict[int, tuple[str, str]]:
    """The members' part: each checkpoint file and its checksum beside it; returns what
    ``Members.finish_checkpoints`` hands the driver ({member: (path, SHA-256)})."""
    root = Path(store.uri)
    out = {}
    for m, (rel, step) in paths.items():
        body = f"step {step}".encode()
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        out[m] = (rel, hashlib.sha256(body).hexdigest())
        (root / (rel + ".sha256")).write_text(out[m][1] + "\n")
    return out


def apply_records(records: Records, decisions: list, r: int, params: dict) -> None:
    """The records' side of a plan: what ``apply_decisions`` writes once the members took it."""
    pending = [d for d in decisions if not isinstance(d, Keep)]
    before = records_before(records, pending)
    for d in pending:
        if isinstance(d, (Exploit, Crossover)):
            source = d.donor if isinstance(d, Exploit) else d.weights_from
            params[d.member] = params[source]
            record_applied(records, d, before, source, r, step=before[source].step,
                           params=params[source], latency=0.001, received={"read_s": 0.0, "load_s": 0.001})


def clocks() -> tuple[float, float]:
    """(wall, CPU of this process, its threads included) in seconds."""
    return time.perf_counter(), time.process_time()


def one_round(records: Records, strategy, monitor: Monitor, progress: Progress, r: int,
              rng: np.random.Generator, params: dict) -> tuple[float, float, float, float]:
    """One sync round as the driver does it; returns (decision ms, bookkeeping ms) in wall
    time, then the same in CPU time of the process."""
    results = stub_results(records, rng, params)
    records.store.wait_pruned()   # the last commit's background deletion: timed on its own (prune CPU)
    t0 = clocks()
    records.record_results(results)
    t1 = clocks()
    decisions = strategy.plan(records.snapshot(r), np.random.default_rng([0, r]))
    t2 = clocks()
    apply_records(records, decisions, r, params)
    paths = records.set_checkpoints(records.ids, r)
    t3 = clocks()
    written = write_checkpoints(records.store, paths)   # the members' work: not timed
    t4 = clocks()
    records.saved(written)
    steps = records.steps_done + INTERVAL
    members, lineage = records.commit(r, steps_done=steps)
    monitor.on_round(r, members, lineage, results)
    progress.update(r, steps)
    settle_heap()
    t5 = clocks()

    def ms(c: int) -> tuple[float, float]:   # (decision, bookkeeping) on clock c: 0 wall, 1 CPU
        return (t2[c] - t1[c]) * 1e3, ((t1[c] - t0[c]) + (t3[c] - t2[c]) + (t5[c] - t4[c])) * 1e3

    return (*ms(0), *ms(1))


class Parts(NamedTuple):
    store: RunStore
    strategy: Strategy
    records: Records
    monitor: Monitor
    progress: Progress
    params: dict[int, int]   # member -> parameter count


@contextlib.contextmanager
def driver_parts(strategy_name: str, n: int, rounds: int) -> Iterator[Parts]:
    """The driver's parts for ``n`` stub members in a temporary run store, opened, with each
    member's parameter count; closed (and the background prune waited for) before it goes."""
    with tempfile.TemporaryDirectory() as storage:
        setup = setup_for(strategy_name, n, storage, rounds)
        store = RunStore(storage, setup.name)
        strategy = make_strategy(setup.strategy, setup.space)
        records = Records(setup, store, strategy, 1)
        records.open()
        monitor = Monitor(setup, store, resumed=False)
        progress = Progress(setup.name, records, Console())
        records.start_clock(n)
        counts: dict[str, int] = {}
        params = {m: counts.setdefault(json.dumps(records[m].genome, sort_keys=True),
                                       setup.space.count_parameters(Genome.from_dict(records[m].genome)))
                  for m in records.ids}
        yield Parts(store, strategy, records, monitor, progress, params)
        monitor.close("finished")
        store.wait_pruned()   # before the folder goes


def measure(strategy_name: str, n: int, warmup: int, rounds: int) -> dict:
    with driver_parts(strategy_name, n, warmup + rounds) as d:
        rng = np.random.default_rng([n, 1])
        timed = []
        for r in range(1, warmup + rounds + 1):
            before = getattr(d.store, "delete_cpu_s", 0.0)   # (an older store: not counted)
            t = one_round(d.records, d.strategy, d.monitor, d.progress, r, rng, d.params)
            d.store.wait_pruned()
            if r > warmup:
                timed.append((*t, (getattr(d.store, "delete_cpu_s", 0.0) - before) * 1e3))
        state_bytes = json.loads((Path(d.store.uri) / "state.json").read_text())["bytes"]
    plan_ms, book_ms, plan_cpu, book_cpu, prune_cpu = zip(*timed)
    return {"strategy": strategy_name, "n": n, "decision_ms": statistics.median(plan_ms),
            "bookkeeping_ms": statistics.median(book_ms),
            "total_ms": statistics.median(p + b for p, b in zip(plan_ms, book_ms)),
            "decision_cpu_ms": statistics.median(plan_cpu), "bookkeeping_cpu_ms": statistics.median(book_cpu),
            "total_cpu_ms": statistics.median(p + b for p, b in zip(plan_cpu, book_cpu)),
            "prune_cpu_ms": statistics.median(prune_cpu), "state_bytes": state_bytes}


def measure_async(strategy_name: str, n: int, warmup: int, events: int) -> dict:
    """Async mode's unit of work at n members: one member's result, its decision
    (``plan(ready=[m])``), its checkpoint and a whole commit, as ``driver.async_events`` does
    after every event; after ``warmup`` sync rounds (histories, checkpoints). Returns the median
    ms per event and that times n (a round of events)."""
    with driver_parts(strategy_name, n, warmup + events) as d:
        store, strategy, records, monitor, progress, params = d
        rng = np.random.default_rng([n, 2])
        for r in range(1, warmup + 1):
            one_round(records, strategy, monitor, progress, r, rng, params)
        plan_ms, book_ms = [], []
        for e in range(events):
            m = records.ids[(e * 7919) % n]   # members finish in some order
            result = {m: stub_results(records, rng, params)[m]}
            t0 = time.perf_counter()
            records.record_results(result)
            t1 = time.perf_counter()
            decisions = strategy.plan(records.snapshot(warmup), np.random.default_rng([0, warmup, e]), ready=[m])
            t2 = time.perf_counter()
            apply_records(records, decisions, warmup, params)
            paths = records.set_checkpoints([m], records[m].intervals)
            t3 = time.perf_counter()
            written = write_checkpoints(store, paths)
            t4 = time.perf_counter()
            records.saved(written)
            steps = min(x.step for x in records.members.values())
            members, lineage = records.commit(warmup, steps_done=steps, events=warmup * n + e + 1)
            monitor.on_round(warmup, members, lineage, result)
            settle_heap()
            t5 = time.perf_counter()
            plan_ms.append((t2 - t1) * 1e3)
            book_ms.append(((t1 - t0) + (t3 - t2) + (t5 - t4)) * 1e3)
    event_ms = statistics.median(p + b for p, b in zip(plan_ms, book_ms))
    return {"strategy": strategy_name, "n": n, "decision_ms": statistics.median(plan_ms),
            "bookkeeping_ms": statistics.median(book_ms), "event_ms": event_ms, "round_ms": event_ms * n}


def exponent(rows: list[dict], key: str) -> float | None:
    """k of ms ∝ n^k, least squares on log-log over the sizes >= FIT_FROM (all, if fewer than two)."""
    pts = [(r["n"], r[key]) for r in rows if r["n"] >= FIT_FROM] or [(r["n"], r[key]) for r in rows]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([max(p[1], 1e-6) for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def table(rows: list[dict], strategies: list[str]) -> str:
    keys = ("decision_ms", "bookkeeping_ms", "total_ms", "decision_cpu_ms", "bookkeeping_cpu_ms", "total_cpu_ms",
            "prune_cpu_ms")
    widths = (13, 16, 10, 10, 10, 10, 11)
    lines = [f"{'strategy':<9}{'n':>6}{'decision ms':>13}{'bookkeeping ms':>16}{'total ms':>10}"
             f"{'dec CPU':>10}{'book CPU':>10}{'tot CPU':>10}{'prune CPU':>11}{'commit MB':>10}"]
    for s in strategies:
        mine = [r for r in rows if r["strategy"] == s]
        for r in mine:
            lines.append(f"{s:<9}{r['n']:>6}" + "".join(f"{r.get(key, 0.0):>{w}.1f}" for key, w in zip(keys, widths))
                         + f"{r['state_bytes'] / 1e6:>10.2f}")
        k = {key: exponent(mine, key) for key in keys}
        lines.append(f"{s:<9}{'k':>6}" + "".join(f"{k[key]:>{w}.2f}" if k[key] is not None else f"{'-':>{w}}"
                                                for key, w in zip(keys, widths)))
    return "\n".join(lines)


def plot(rows: list[dict], strategies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({r["n"] for r in rows})
    for s in strategies:
        mine = sorted((r for r in rows if r["strategy"] == s), key=lambda r: r["n"])
        line, = ax.plot([r["n"] for r in mine], [r["total_ms"] for r in mine], "o-", label=f"{s} total")
        ax.plot([r["n"] for r in mine], [r["decision_ms"] for r in mine], "x--", color=line.get_color(),
                alpha=0.6, label=f"{s} decision")
    if sizes:
        mid = sizes[len(sizes) // 2]   # the reference passes through the middle size's median total
        c = statistics.median(r["total_ms"] for r in rows if r["n"] == mid) / (mid * math.log2(mid))
        ax.plot(sizes, [c * n * math.log2(n) for n in sizes], ":", color="gray", label="n log n")
    ax.axhline(100, color="red", lw=0.8, ls="--", label="goal: 100 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("members")
    ax.set_ylabel("ms per round")
    ax.set_title("driver: decision + bookkeeping per round")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="sizes 16 and 64, one timed round (smoke test)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (the median is shown)")
    ap.add_argument("--out", default="bench-out", help="folder for driver_scale.png and driver_scale.json")
    ap.add_argument("--async-events", type=int, default=0, metavar="K",
                    help="also time K async events (one member's result, decision, checkpoint and "
                         "commit) per strategy at each size >= 256, after the warm-up rounds")
    args = ap.parse_args(argv)
    if args.small:
        args.sizes, args.warmup, args.rounds = list(SMALL["sizes"]), SMALL["warmup"], SMALL["rounds"]
    if min(args.sizes) < 2 or args.rounds < 1 or args.warmup < 0 or args.async_events < 0:
        print("driver_scale: sizes must be >= 2, --rounds >= 1, --warmup and --async-events >= 0", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in args.strategies:
        for n in sorted(args.sizes):
            rows.append(measure(s, n, args.warmup, args.rounds))
            print(f"  {s} n={n}: {rows[-1]['total_ms']:.1f} ms, {rows[-1]['total_cpu_ms']:.1f} CPU ms",
                  file=sys.stderr, flush=True)
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{os.cpu_count()} CPUs; median of {args.rounds} timed rounds after {args.warmup} untimed")
    print(table(rows, args.strategies))
    plot(rows, args.strategies, out / "driver_scale.png")
    async_rows = []
    if args.async_events:
        for s in args.strategies:
            for n in sorted(x for x in args.sizes if x >= FIT_FROM):
                async_rows.append(measure_async(s, n, args.warmup, args.async_events))
                print(f"  async {s} n={n}: {async_rows[-1]['event_ms']:.2f} ms/event", file=sys.stderr, flush=True)
    (out / "driver_scale.json").write_text(json.dumps({"rows": rows, "exponents": {
        s: {k: exponent([r for r in rows if r["strategy"] == s], k)
            for k in ("decision_ms", "bookkeeping_ms", "total_ms", "total_cpu_ms", "prune_cpu_ms")}
        for s in args.strategies}, "async": async_rows}, indent=1) + "\n")
    print(f"plot: {out / 'driver_scale.png'}")
    if async_rows:
        print(f"\nasync, per event (median of {args.async_events}); a round is n events:")
        print(f"{'strategy':<9}{'n':>6}{'decision ms':>13}{'bookkeeping ms':>16}{'event ms':>10}{'round ms':>10}")
        for r in async_rows:
            print(f"{r['strategy']:<9}{r['n']:>6}{r['decision_ms']:>13.2f}{r['bookkeeping_ms']:>16.2f}"
                  f"{r['event_ms']:>10.2f}{r['round_ms']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
