"""How often does a merge crossover's child beat both its parents inside a real search?

Reads finished runs (their lineage and last committed state) and, for each crossover, compares
the child's next evaluation with its parents' evaluations at the same step (sync mode: every
member is evaluated at the same steps), and with the parents' val bpb when the merge was
planned. A parent whose own weights changed in the same round (it was itself a receiver) has
no comparable next evaluation: that comparison is left out and counted. Crossovers without
alpha (weights copied from the fitter parent) are the baseline of the same runs; merges with a
layer map (parents of two architectures) are counted apart from interpolations.

    evo run experiments/ga_crossover.yaml --set strategy.merge=true --name NAME --storage ROOT
    .venv/bin/python bench/merge_in_search.py ROOT/NAME [ROOT/NAME2 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from population.store import RunStore  # noqa: E402

WEIGHT_EVENTS = ("exploit", "crossover", "restart", "died", "restored")   # a member's weights replaced


def kind(record: dict) -> str:
    """'layer-wise', 'interpolated' or 'copied' (no merge) for a crossover lineage record."""
    if "layers" in record:
        return "layer-wise"
    return "interpolated" if "alpha" in record else "copied"


def crossover_outcomes(lineage: list[dict], state: dict) -> list[dict]:
    """One row per crossover: its kind, the child's next val bpb, the parents' val bpb at that step
    (None for a parent whose weights changed in the same round) and at the merge."""
    history = {m["id"]: {int(s): float(v) for s, v in m["history"]} for m in state["members"]}
    changed = {(r["round"], r["member"]) for r in lineage if r["event"] in WEIGHT_EVENTS}
    rows = []
    for r in lineage:
        if r["event"] != "crossover":
            continue
        later = sorted(s for s in history[r["member"]] if s > r["step"])
        if not later:
            continue                                    # the run ended before the child was judged
        step = later[0]
        parents_next = [None if (r["round"], p) in changed else history[p].get(step) for p in r["parents"]]
        rows.append({"kind": kind(r), "round": r["round"], "member": r["member"], "step": step,
                     "alpha": r.get("alpha"), "child": history[r["member"]][step],
                     "parents_next": parents_next, "parents_then": list(r["parent_fitness"])})
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per kind: crossovers, below both parents' next evaluations (of those comparable), below
    both parents' val bpb at the merge."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        k = out.setdefault(row["kind"], {"n": 0, "comparable": 0, "below_both_next": 0, "below_both_then": 0})
        k["n"] += 1
        if all(v is not None for v in row["parents_next"]):
            k["comparable"] += 1
            k["below_both_next"] += row["child"] < min(row["parents_next"])
        k["below_both_then"] += row["child"] < min(row["parents_then"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (ROOT/NAME)")
    ap.add_argument("--rows", action="store_true", help="print every crossover")
    args = ap.parse_args()
    total: list[dict] = []
    for run in map(Path, args.runs):
        store = RunStore(str(run.parent), run.name)
        state = store.read_state()
        if state is None:
            sys.exit(f"merge_in_search: {run} has no committed round")
        rows = crossover_outcomes(store.read_lineage(), state)
        total += rows
        for row in rows if args.rows else ():
            print(json.dumps({"run": run.name, **row}))
        print(f"{run.name}: " + json.dumps(summarise(rows)))
    print("all: " + json.dumps(summarise(total)))


if __name__ == "__main__":
    main()
