"""bench/merge_in_search.py: crossovers read from a lineage and a state are classed (copied,
interpolated, layer-wise) and compared with both parents at the child's next evaluation; a
parent that was itself a receiver in that round is not compared; a missing run is one line."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
from merge_in_search import crossover_outcomes, summarise  # noqa: E402


def _x(round, member, parents, step, fitness, **extra):
    return {"event": "crossover", "round": round, "member": member, "parents": parents, "step": step,
            "parent_fitness": fitness, **extra}


def test_crossovers_are_compared_with_both_parents_at_the_next_evaluation():
    state = {"members": [
        {"id": 0, "history": [[10, 3.0], [20, 2.9]]},
        {"id": 1, "history": [[10, 3.1], [20, 2.95]]},
        {"id": 2, "history": [[10, 3.5], [20, 2.8]]},    # merged child: below both at step 20
        {"id": 3, "history": [[10, 3.6], [20, 2.92]]},   # copied child: below one
        {"id": 4, "history": [[10, 3.7], [20, 2.5]]},    # layer-wise child whose parent 3 changed too
    ]}
    lineage = [{"event": "born", "round": 0, "member": m} for m in range(5)] + [
        _x(1, 2, [0, 1], 10, [3.0, 3.1], alpha=0.4),
        _x(1, 3, [0, 1], 10, [3.0, 3.1]),
        _x(1, 4, [0, 3], 10, [3.0, 3.6], alpha=0.7, layers={"tok_embeddings": 0}),
        _x(2, 0, [1, 2], 20, [2.95, 2.8], alpha=0.5),   # not judged again: left out
    ]
    rows = crossover_outcomes(lineage, state)
    assert [(r["kind"], r["member"], r["child"], r["parents_next"]) for r in rows] == [
        ("interpolated", 2, 2.8, [2.9, 2.95]), ("copied", 3, 2.92, [2.9, 2.95]), ("layer-wise", 4, 2.5, [2.9, None])]
    assert summarise(rows) == {
        "interpolated": {"n": 1, "comparable": 1, "below_both_next": 1, "below_both_then": 1},
        "copied": {"n": 1, "comparable": 1, "below_both_next": 0, "below_both_then": 1},
        "layer-wise": {"n": 1, "comparable": 0, "below_both_next": 0, "below_both_then": 1}}


def test_a_run_without_a_commit_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "merge_in_search.py"), str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "no committed round" in proc.stderr
