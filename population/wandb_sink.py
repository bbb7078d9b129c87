"""Weights & Biases sink: one W&B run per member and one driver run, grouped by the search.

Runs (all in ``logging.wandb.project``, ``group`` = the search's name)::

    <name>-m<id>-<key>      job_type "member": the member's evaluations and its hyperparameters
    <name>-driver-<key>     job_type "driver": population figures per round, the lineage table

``<key>`` is a short hash of the run store's URI, so the ids are stable across sessions of one
search and distinct between searches of the same name in different stores. Every session opens
the same ids with ``resume="allow"``: a resumed search continues the same W&B runs.

What is logged:

- run config: only what never changes (the resolved experiment config, the member id);
- member rows, x-axis ``member/step``: after each interval ``val_bpb``, ``val_loss``,
  ``train_loss``, ``tokens_per_s``, ``seconds``, ``params`` and ``hp/<gene>`` = the genome that
  trained it, and with several data sources ``mix/<source>`` = each source's share of the
  batches under that genome (its data.mix genes over data.mix, normalised); after each lineage
  event a row at the member's new step with ``event/<event>`` = 1 (and ``parent``) and the new
  ``hp/<gene>`` (and ``mix/<source>``) values; at each session's start a row with ``event/born``
  or ``event/resume`` — so the hyperparameter schedule reads off the ``hp/`` charts;
- driver rows, x-axis ``round``: ``best_val_bpb``, ``median_val_bpb``, ``best_member``,
  ``alive``, the round's ``exploits``/``explores``/``crossovers``/``restarts``/``failures``/
  ``restores`` (members whose process died, restored from their own state) and their running
  totals ``total/exploits`` …, ``tokens_per_s`` (sum of the members' last);
- the lineage (``lineage.jsonl``) as a W&B Table ``lineage`` on the driver run, every
  ``table_every`` rounds and at close.

Steps. The x-axes are custom step metrics (``define_metric``), free to go back when an exploit
copies a donor's step. W&B's own ``_step`` must only grow, and an offline run that is resumed
restarts it at 0 (offline, W&B cannot ask the server where it stopped), so each row gets an
explicit step from counters kept in the run store (``wandb_state.json``). The counters are
saved *before* the rows are logged: a driver killed in between leaves a gap, never a repeat.

Files. Offline (the default) needs no network: each session of each run writes
``<run dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`` when the store is local (else under
``$WANDB_DIR`` or ``./wandb``); ``wandb sync <run dir>/wandb`` uploads them later, the several
sessions of one run in order of start time.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Mapping

import wandb

from population.inspect import mix_shares
from population.monitor import EVENTS, evaluated, event_counts, population_stats

if TYPE_CHECKING:
    from population.config import SearchSetup
    from population.store import RunStore

STATE_FILE = "wandb_state.json"
DRIVER = "driver"
RESULT_KEYS = ("val_bpb", "val_loss", "train_loss", "tokens_per_s", "seconds", "params")
# driver-row names of the per-round event counts
PLURAL = {"exploit": "exploits", "explore": "explores", "crossover": "crossovers",
          "restart": "restarts", "died": "failures", "restored": "restores"}
LINEAGE_COLUMNS = ["round", "event", "member", "parents", "step", "fitness", "changed", "how",
                   "error", "genome"]


def run_key(uri: str) -> str:
    """8 hex digits naming a run store; part of every W&B run id of its search."""
    return hashlib.sha256(uri.encode()).hexdigest()[:8]


class WandbSink:
    """The member runs and the driver run of one search (several W&B runs in one process)."""

    name = "wandb"

    def __init__(self, setup: SearchSetup, store: RunStore, resumed: bool,
                 table_every: int = 10) -> None:
        self.cfg = setup.logging.wandb
        self.search = setup.name
        self.config = dict(setup.config)
        self.store = store
        self.resumed = resumed
        self.table_every = table_every
        self.key = run_key(store.uri)
        # the run directory on a local store; elsewhere W&B's default ($WANDB_DIR or ./wandb)
        self.dir = store.uri if store.local_path(STATE_FILE) is not None else None
        self.runs: dict[str, Any] = {}            # "driver" | "m<id>" -> wandb Run
        self.genomes: dict[int, dict] = {}        # the genome each member trains with now
        self.tokens_per_s: dict[int, float] = {}  # each member's last measured throughput
        self.state: dict[str, Any] = {"steps": {}, "totals": {e: 0 for e in EVENTS}, "round": None}
        if store.exists_path(STATE_FILE):
            saved = json.loads(store.read_text(STATE_FILE))
            self.state["steps"].update(saved.get("steps", {}))
            self.state["totals"].update(saved.get("totals", {}))
            self.state["round"] = saved.get("round")
        self.table_round: int | None = None

    def run_id(self, who: str) -> str:
        """The stable W&B id of the driver run (``who="driver"``) or a member run (``"m3"``)."""
        return f"{self.search[:100]}-{who}-{self.key}"

    def _genes(self, genome: Mapping[str, Any]) -> dict[str, Any]:
        """``hp/<gene>`` and, with several data sources, ``mix/<source>``: each source's share of
        the batches (the genome's data.mix genes over data.mix, normalised)."""
        return {**_hp(genome), **{f"mix/{src}": v for src, v in mix_shares(self.config.get("data"), genome).items()}}

    # -- the monitor's calls ---------------------------------------------------------------------

    def start(self, members: list[dict], round: int) -> None:
        self._open(DRIVER, job_type="driver", step_metric="round", config=self.config)
        rows: list[tuple[str, dict]] = []
        event = "resume" if self.resumed else "born"
        for m in members:
            mid = int(m["id"])
            self.genomes[mid] = dict(m["genome"])
            self._open(f"m{mid}", job_type="member", step_metric="member/step",
                       config={**self.config, "member": mid, "member_seed": m.get("seed")})
            rows.append((f"m{mid}", {"member/step": int(m.get("step", 0)), "round": round,
                                     f"event/{event}": 1, **self._genes(m["genome"])}))
        stats = population_stats(members)
        rows.append((DRIVER, {"round": round, "alive": stats["alive"], **_finite(
            best_val_bpb=stats["best"], median_val_bpb=stats["median"])}))
        self._log(rows, round)

    def on_round(self, round: int, members: list[dict], lineage: list[dict],
                 results: Mapping[int, Any]) -> None:
        rows: list[tuple[str, dict]] = []
        done = evaluated(results)
        for mid in sorted(done):
            res = done[mid]
            rows.append((f"m{mid}", {"member/step": int(res["step"]), "round": round,
                                     **{k: res[k] for k in RESULT_KEYS if k in res},
                                     **self._genes(self.genomes.get(mid, {}))}))
        for rec in lineage:
            row = {"member/step": int(rec.get("step") or 0), "round": round,
                   f"event/{rec['event']}": 1, **self._genes(rec.get("genome") or {})}
            if rec.get("parents"):
                row["parent"] = int(rec["parents"][0])
            rows.append((f"m{int(rec['member'])}", row))
        counts = event_counts(lineage)
        totals = self.state["totals"]
        for e, n in counts.items():
            totals[e] = totals.get(e, 0) + n
        stats = population_stats(members)
        driver = {"round": round, "alive": stats["alive"],
                  **_finite(best_val_bpb=stats["best"], median_val_bpb=stats["median"]),
                  **{PLURAL[e]: counts[e] for e in PLURAL},
                  **{f"total/{PLURAL[e]}": totals[e] for e in PLURAL}}
        if stats["best_member"] >= 0:
            driver["best_member"] = stats["best_member"]
        for mid, res in done.items():
            self.tokens_per_s[mid] = float(res.get("tokens_per_s", 0.0))
        if self.tokens_per_s:   # each member's last throughput (async: one member per call)
            driver["tokens_per_s"] = sum(self.tokens_per_s.values())
        rows.append((DRIVER, driver))
        self._log(rows, round)
        for m in members:
            self.genomes[int(m["id"])] = dict(m["genome"])
        if self.table_every and round % self.table_every == 0 and round != self.table_round:
            self._log_lineage(round)

    def close(self, status: str) -> None:
        exit_code = 1 if status == "failed" else 0
        driver = self.runs.get(DRIVER)
        try:
            if driver is not None:
                round = self.state["round"] if self.state["round"] is not None else 0
                if round != self.table_round:
                    self._log_lineage(round)
                driver.summary["status"] = status
        finally:
            for run in self.runs.values():
                run.finish(exit_code=exit_code)
            self.runs = {}

    # -- helpers ---------------------------------------------------------------------------------

    def _open(self, who: str, job_type: str, step_metric: str, config: dict) -> None:
        """Start (or continue: ``resume="allow"``) the W&B run ``who``; one per process and id."""
        if who in self.runs:
            return
        settings: dict[str, Any] = {"silent": True, "console": "off", "disable_git": True,
                                    "save_code": False}
        if who != DRIVER and "x_disable_stats" in getattr(wandb.Settings, "model_fields", {}):
            settings["x_disable_stats"] = True   # system metrics once, on the driver run
        run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, mode=self.cfg.mode, dir=self.dir,
            id=self.run_id(who), name=f"{self.search}/{who}", group=self.search,
            job_type=job_type, config=config, resume="allow", reinit="create_new",
            settings=wandb.Settings(**settings),
        )
        run.define_metric(step_metric)
        run.define_metric("*", step_metric=step_metric)
        self.runs[who] = run

    def _log(self, rows: list[tuple[str, dict]], round: int) -> None:
        """Give each row the next step of its run, save the counters, then log the rows."""
        steps = self.state["steps"]
        numbered = []
        for who, row in rows:
            numbered.append((who, row, steps.get(who, 0)))
            steps[who] = steps.get(who, 0) + 1
        self.state["round"] = round
        self.store.write_text(STATE_FILE, json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        for who, row, step in numbered:
            if who not in self.runs:   # a member the monitor has not seen yet
                self._open(who, job_type="member", step_metric="member/step",
                           config={**self.config, "member": int(who[1:])})
            self.runs[who].log(row, step=step)

    def _log_lineage(self, round: int) -> None:
        """The whole lineage so far as a W&B Table on the driver run."""
        table = wandb.Table(columns=LINEAGE_COLUMNS)
        for rec in self.store.read_lineage():
            how = rec.get("how") or rec.get("weights_from")
            table.add_data(rec.get("round"), rec.get("event"), rec.get("member"),
                           json.dumps(rec.get("parents", [])), rec.get("step"), rec.get("fitness"),
                           rec.get("changed", ""), "" if how is None else str(how),
                           rec.get("error", ""), json.dumps(rec.get("genome", {}), sort_keys=True))
        self._log([(DRIVER, {"round": round, "lineage": table})], round)
        self.table_round = round


def _hp(genome: Mapping[str, Any]) -> dict[str, Any]:
    """``{"hp/<gene path>": value}``; booleans as 0/1 so they chart, nulls left out."""
    return {f"hp/{p}": int(v) if isinstance(v, bool) else v
            for p, v in genome.items() if v is not None}


def _finite(**values: float) -> dict[str, float]:
    """The values that are numbers (NaN, e.g. best before any evaluation, is left out)."""
    return {k: float(v) for k, v in values.items() if v == v}
