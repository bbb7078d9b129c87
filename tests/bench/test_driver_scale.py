"""bench/driver_scale.py --small: the table is complete and well formed, the plot is written.
A smoke test of the benchmark's code paths; it never looks at how long anything took."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.helpers import REPO

STRATEGIES = ("pbt", "pb2", "ga", "nsga2")
SIZES = (16, 64)


def test_small_setting_prints_every_row_and_writes_the_plot(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "driver_scale.py"), "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    assert lines[header].split() == ["strategy", "n", "decision", "ms", "bookkeeping", "ms", "total", "ms",
                                     "dec", "CPU", "book", "CPU", "tot", "CPU", "prune", "CPU", "commit", "MB"]
    rows = [line.split() for line in lines[header + 1:] if line and not line.startswith("plot:")]
    assert len(rows) == len(STRATEGIES) * (len(SIZES) + 1)
    for s, block in zip(STRATEGIES, [rows[i:i + len(SIZES) + 1] for i in range(0, len(rows), len(SIZES) + 1)]):
        assert [r[0] for r in block] == [s] * (len(SIZES) + 1)
        assert [int(r[1]) for r in block[:-1]] == list(SIZES)
        for r in block[:-1]:
            decision, bookkeeping, total, decision_cpu, bookkeeping_cpu, total_cpu, prune_cpu, commit_mb = map(float, r[2:])
            assert decision >= 0 and bookkeeping > 0 and commit_mb > 0 and decision_cpu >= 0 and bookkeeping_cpu >= 0
            assert prune_cpu >= 0
            assert math.isclose(total, decision + bookkeeping, abs_tol=0.15)
            assert math.isclose(total_cpu, decision_cpu + bookkeeping_cpu, abs_tol=0.15)
        assert block[-1][1] == "k" and all(math.isfinite(float(x)) for x in block[-1][2:5])
    data = json.loads((out / "driver_scale.json").read_text())
    assert sorted((r["strategy"], r["n"]) for r in data["rows"]) == sorted((s, n) for s in STRATEGIES for n in SIZES)
    assert set(data["exponents"]) == set(STRATEGIES)
    png = out / "driver_scale.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
