"""Ray metrics of a search: gauges and counters the driver exports through Ray's metrics agent.

Every Ray node runs a metrics agent that serves what ``ray.util.metrics`` records in Prometheus
format (``ray start --metrics-export-port`` / ``ray.init(_metrics_export_port=...)``); Ray
prefixes each name with ``ray_`` and a Counter gets Prometheus' ``_total`` suffix, so the
scraped names are::

    ray_evo_best_fitness{run}              gauge: best val_bpb of the live members
    ray_evo_median_fitness{run}            gauge: median val_bpb of the live members
    ray_evo_member_tokens_per_s{run,member}  gauge: each member's last measured throughput
    ray_evo_exploits_total{run}            counter: exploit events (weights copied from a donor)
    ray_evo_crossovers_total{run}          counter
    ray_evo_restarts_total{run}            counter
    ray_evo_failures_total{run}            counter: members that died (diverged or given up)
    ray_evo_restores_total{run}            counter: members whose process died (killed, node lost),
                                           restored from their own state

Counters cannot be set, so a resumed driver only adds the events it sees itself; Prometheus'
``rate()`` / ``increase()`` treat the restart as a counter reset.

Ray's agent forgets a gauge that has not been recorded for two report intervals
(``RAY_metrics_report_interval_ms``, 10 s by default), and a round can last much longer, so a
daemon thread records the last values again every half interval until ``close``.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Mapping

from ray.util.metrics import Counter, Gauge

from population.monitor import evaluated, event_counts, population_stats

# counter name (Ray adds "_total" when exporting) -> the lineage event it counts
COUNTED = {"evo_exploits": "exploit", "evo_crossovers": "crossover",
           "evo_restarts": "restart", "evo_failures": "died", "evo_restores": "restored"}


def refresh_period() -> float:
    """Seconds between two recordings of the gauges: half of Ray's metrics report interval."""
    try:
        interval_ms = float(os.environ.get("RAY_metrics_report_interval_ms", "10000"))
    except ValueError:
        interval_ms = 10000.0
    return min(max(interval_ms / 2000.0, 0.25), 5.0)


class RayMetricsSink:
    """Population-level gauges and event counters, tagged with the run name."""

    name = "ray-metrics"

    def __init__(self, run: str) -> None:
        self.run = run
        self.best = Gauge("evo_best_fitness", "best val_bpb (bits per byte) among the live members",
                          tag_keys=("run",))
        self.median = Gauge("evo_median_fitness", "median val_bpb among the live members",
                            tag_keys=("run",))
        self.tokens_per_s = Gauge("evo_member_tokens_per_s", "training throughput of a member",
                                  tag_keys=("run", "member"))
        self.counters = {name: Counter(name, f"{event} events of the search", tag_keys=("run",))
                         for name, event in COUNTED.items()}
        for metric in (self.best, self.median, self.tokens_per_s, *self.counters.values()):
            metric.set_default_tags({"run": run})
        # the last gauge values: (gauge, member tag or None) -> value; re-recorded by the thread
        self._values: dict[tuple[str, str | None], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, args=(refresh_period(),),
                                        name=f"evo-metrics-{run}", daemon=True)
        self._thread.start()

    def start(self, members: list[dict], round: int) -> None:
        values = self._population(members)
        for m in members:
            tps = (m.get("objectives") or {}).get("tokens_per_s")
            if tps is not None:
                values[("tokens_per_s", str(m["id"]))] = float(tps)
        self._set(values)

    def on_round(self, round: int, members: list[dict], lineage: list[dict],
                 results: Mapping[int, Any]) -> None:
        values = self._population(members)
        for m, res in evaluated(results).items():
            values[("tokens_per_s", str(m))] = float(res["tokens_per_s"])
        self._set(values)
        counts = event_counts(lineage)
        for name, event in COUNTED.items():
            if counts[event]:
                self.counters[name].inc(counts[event])

    def close(self, status: str) -> None:
        self._stop.set()
        self._thread.join()

    # -- gauges ----------------------------------------------------------------------------------

    @staticmethod
    def _population(members: list[dict]) -> dict[tuple[str, str | None], float]:
        stats = population_stats(members)
        if stats["best_member"] < 0:
            return {}
        return {("best", None): stats["best"], ("median", None): stats["median"]}

    def _set(self, values: dict[tuple[str, str | None], float]) -> None:
        with self._lock:
            self._values.update(values)
            self._record()

    def _record(self) -> None:
        gauges = {"best": self.best, "median": self.median, "tokens_per_s": self.tokens_per_s}
        for (gauge, member), value in self._values.items():
            gauges[gauge].set(value, tags=None if member is None else {"member": member})

    def _refresh(self, period: float) -> None:
        while not self._stop.wait(period):
            with self._lock:
                self._record()
