"""bench/arch_search.py --small: the table is complete and well formed, every variant ran the same
optimizer steps, the JSON and the plot are written. A smoke test of the benchmark's code paths
(real driver, real members, joined to the session's `ray start --head`, tests/conftest.py); it never looks at how long anything took."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO

VARIANTS = ["search", "base", "largest"]


@pytest.mark.slow
def test_small_setting_prints_every_row_and_writes_the_plot(tmp_path, ray_head):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "arch_search.py"), "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=ray_head.driver_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("workload: arch_search.yaml, 3 members x 4 steps, interval 2, start ")
    assert "seeds [0]; budget 400000 params" in lines[0]
    header = lines.index("variant  seed best_val_bpb params_best  steps vs_best_fixed")
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == VARIANTS and all(r[1] == "0" for r in rows)
    bpb = {r[0]: float(r[2]) for r in rows}
    assert all(math.isfinite(b) and b > 0 for b in bpb.values())
    assert {int(r[4]) for r in rows} == {12}            # 3 members x 4 steps in every variant
    ratios = [float(r[5]) for r in rows]
    assert min(ratios[1:]) == 1.0                       # against the best fixed shape of the seed
    assert math.isclose(ratios[0], bpb["search"] / min(bpb["base"], bpb["largest"]), abs_tol=1e-4)
    assert any(line.startswith("search beats every fixed shape") and line.endswith("of 1 seeds") for line in lines)
    front_header = next(i for i, line in enumerate(lines) if line.startswith("fixed    seed"))
    front = [line.split() for line in lines[front_header + 1:front_header + 3]]
    assert [r[0] for r in front] == ["base", "largest"] and all(r[-1] in ("yes", "no") for r in front)

    data = json.loads((out / "arch_search.json").read_text())
    assert set(data["results"]) == set(VARIANTS) and all(len(v) == 1 for v in data["results"].values())
    base_params = {m["params"] for m in data["results"]["base"][0]["members"]}
    largest_params = {m["params"] for m in data["results"]["largest"][0]["members"]}
    assert len(base_params) == 1 and len(largest_params) == 1           # fixed shapes stay fixed
    assert largest_params.pop() <= data["budget"] and data["budget"] == 400_000
    for m in data["results"]["search"][0]["members"]:
        assert m["params"] <= data["budget"]
        assert m["genome"]["model.hidden_size"] == 16 * m["genome"]["model.num_attention_heads"]
    png = out / "arch_search.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # one line per finished search, as it ends; --combine rebuilds the same tables from them, running nothing
    runs = [json.loads(line) for line in (out / "arch_search.runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in runs] == [(v, 0) for v in VARIANTS]
    again = subprocess.run([sys.executable, str(REPO / "bench" / "arch_search.py"), "--small", "--out", str(tmp_path / "again"),
                            "--combine", str(out / "arch_search.runs.jsonl")],
                           capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.splitlines()[:-1] == lines[:-1]      # all but the plot's path
    assert json.loads((tmp_path / "again" / "arch_search.json").read_text()) == data
    # two seeds (the second one this run's searches with other best figures): the means and
    # the search's paired differences by seed
    best = {("search", 1): 2.0, ("base", 1): 2.3, ("largest", 1): 1.9}
    two = runs + [{**r, "seed": 1, "best_val_bpb": best[r["variant"], 1]} for r in runs]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two))
    paired = subprocess.run([sys.executable, str(REPO / "bench" / "arch_search.py"), "--small", "--out",
                             str(tmp_path / "two"), "--combine", str(tmp_path / "two.jsonl")],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert paired.returncode == 0, paired.stderr[-2000:]
    out_lines = paired.stdout.splitlines()
    bpb = {r["variant"]: r["best_val_bpb"] for r in runs}    # unrounded, as the script has them
    mean = {v: (bpb[v] + best[v, 1]) / 2 for v in VARIANTS}
    std = {v: abs(bpb[v] - best[v, 1]) / math.sqrt(2) for v in VARIANTS}
    assert ("mean ± std best val_bpb: " + ", ".join(f"{v} {mean[v]:.4f} ± {std[v]:.4f}" for v in VARIANTS)) in out_lines
    for v in ("base", "largest"):
        d = [bpb["search"] - bpb[v], best["search", 1] - best[v, 1]]
        line = next(x for x in out_lines if x.startswith(f"search - {v}, paired by seed: "))
        assert f"mean {(d[0] + d[1]) / 2:+.4f} ± {abs(d[0] - d[1]) / 2:.4f} (standard error)" in line
        assert line.endswith(f"search lower in {sum(x < 0 for x in d)} of 2 seeds")
