"""The monitor: fans every committed round out to the sinks that watch a search.

The driver calls four methods, always after the run store holds what they describe::

    monitor = Monitor(setup, store, resumed)       # builds the sinks setup.logging enables
    monitor.start(members, round)                  # the committed members at the loop's start
    monitor.on_round(round, members, lineage, results)   # right after each commit
    monitor.close(status)                          # finished | stopped | failed

Sinks (each in its own file, imported only when enabled, so a search without W&B never pays
for ``import wandb``):

- ``population/wandb_sink.py``: one W&B run per member plus a driver run (``logging.wandb``).
- ``population/optuna_sink.py``: an Optuna study with one trial per hyperparameter segment
  (``logging.optuna``), for optuna-dashboard.
- ``population/metrics.py``: Ray metrics (gauges and counters) for Prometheus / Grafana and the
  Ray dashboard, whenever the driver runs inside Ray.

Monitoring never kills a search: a sink that raises is reported once (a warning on the
``population.monitor`` logger) and switched off for the rest of the session.

The shapes the sinks read: ``members`` are committed ``MemberRecord`` dicts (id, genome, step,
history [[step, val_bpb], ...], objectives, parent, alive, ...) -- views of the driver's records,
not copies (thousands of members), so a sink reads them during the call and copies what it
keeps; ``lineage`` the lineage records
committed with this round ({"event", "round", "member", "parents", "genome", "step", "fitness",
...}); ``results`` maps a member id to its ``train_and_evaluate`` result ({"step", "train_loss",
"val_bpb", "val_loss", "tokens_per_s", "seconds", "params"}), or to the error of a member that
failed (an exception, or a dict with "failed").
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from population.config import SearchSetup
    from population.store import RunStore

log = logging.getLogger(__name__)

# lineage events; all but "died" and "restored" start a new hyperparameter segment of a member's
# life ("restored": its process died and it came back to its own state, same hyperparameters)
EVENTS = ("born", "exploit", "explore", "crossover", "restart", "died", "restored")
SEGMENT_EVENTS = ("born", "exploit", "explore", "crossover", "restart")
STATUSES = ("finished", "stopped", "failed")


class Sink(Protocol):
    """What the monitor calls; the arguments are those of :class:`Monitor`'s methods."""

    name: str

    def start(self, members: list[dict], round: int) -> None: ...

    def on_round(self, round: int, members: list[dict], lineage: list[dict],
                 results: Mapping[int, Any]) -> None: ...

    def close(self, status: str) -> None: ...


class Monitor:
    """The enabled sinks, each guarded: an exception disables that sink, never the search."""

    def __init__(self, setup: SearchSetup, store: RunStore, resumed: bool) -> None:
        self.sinks: list[Sink] = []
        self.disabled: dict[str, str] = {}   # sink name -> why it was switched off
        cfg = setup.logging
        if cfg.wandb.mode != "disabled":
            self._build("wandb", lambda: _wandb_sink(setup, store, resumed))
        if cfg.optuna:
            self._build("optuna", lambda: _optuna_sink(setup, store, resumed))
        if _ray_running():
            self._build("ray-metrics", lambda: _ray_metrics_sink(setup.name))

    def start(self, members: list[dict], round: int) -> None:
        self._each("start", members, round)

    def on_round(self, round: int, members: list[dict], lineage: list[dict],
                 results: Mapping[int, Any]) -> None:
        self._each("on_round", round, members, lineage, results)

    def close(self, status: str) -> None:
        """Finish every sink (``status``: finished | stopped | failed); safe to call twice."""
        if status not in STATUSES:
            raise ValueError(f"status: must be one of {', '.join(STATUSES)}, got {status!r}")
        self._each("close", status)
        self.sinks = []

    # -- guards ----------------------------------------------------------------------------------

    def _build(self, name: str, make: Callable[[], Sink]) -> None:
        try:
            self.sinks.append(make())
        except Exception as e:  # a sink must never stop the search
            self._disable(name, e)

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # a sink must never stop the search
                self.sinks.remove(sink)
                self._disable(sink.name, e)
                if method != "close":
                    try:   # let it flush what it has (W&B runs, Optuna files)
                        sink.close("failed")
                    except Exception:
                        pass

    def _disable(self, name: str, e: BaseException) -> None:
        text = str(e).strip()
        why = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        self.disabled[name] = why
        log.warning("monitoring: the %s sink failed and is off for the rest of this run (%s)", name, why)


def _wandb_sink(setup: SearchSetup, store: RunStore, resumed: bool) -> Sink:
    from population.wandb_sink import WandbSink

    return WandbSink(setup, store, resumed)


def _optuna_sink(setup: SearchSetup, store: RunStore, resumed: bool) -> Sink:
    from population.optuna_sink import OptunaSink

    return OptunaSink(setup, store, resumed)


def _ray_metrics_sink(run: str) -> Sink:
    from population.metrics import RayMetricsSink

    return RayMetricsSink(run)


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


# ----------------------------------------------------------------------------------------------
# What several sinks compute from a round


def evaluated(results: Mapping[int, Any]) -> dict[int, dict]:
    """The successful ``train_and_evaluate`` results of a round, by member id."""
    return {int(m): r for m, r in results.items()
            if isinstance(r, Mapping) and not r.get("failed") and "val_bpb" in r}


def fitness(member: Mapping[str, Any]) -> float | None:
    """A member's last evaluated val_bpb (None before its first evaluation)."""
    history = member.get("history") or []
    return float(history[-1][1]) if history else None


def population_stats(members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Best / median fitness over the live, evaluated members (lower is better), as the driver
    ranks them; NaN when nobody has been evaluated yet."""
    alive = [m for m in members if m.get("alive", True)]
    ranked = sorted((fitness(m), int(m["id"])) for m in alive if fitness(m) is not None)
    if not ranked:
        return {"best": math.nan, "best_member": -1, "median": math.nan, "alive": len(alive)}
    return {"best": ranked[0][0], "best_member": ranked[0][1],
            "median": statistics.median(f for f, _ in ranked), "alive": len(alive)}


def event_counts(lineage: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """{event: how many lineage records of that event}, for every event name (zeros included)."""
    counts = Counter(str(r.get("event")) for r in lineage)
    return {e: counts.get(e, 0) for e in EVENTS}
