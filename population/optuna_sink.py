"""Optuna sink: every segment of a member's life with fixed hyperparameters is one trial.

A segment starts when a member is born, exploits, explores, is crossed over or restarts, and
ends at the member's next such event. The study (name = the search's name, minimize) lives in
the run store — ``<run dir>/optuna.db`` (SQLite) on a local store, else ``optuna.journal``
(an Optuna journal file kept in a temporary directory and copied to the store after every
round) — so ``optuna-dashboard sqlite:///<run dir>/optuna.db`` shows the search as it runs:

- params: the hyperparameter genes, with the distributions of the search space;
- intermediate values: the segment's val_bpb after each interval, at the member's step;
- value: the val_bpb at the segment's end; state COMPLETE when the member moved on (or the
  search finished), FAIL when the member died, RUNNING while the segment lives; a segment that
  ended before its first evaluation is PRUNED;
- user attrs: member, event (what started it), parent / parents, round, start_step,
  architecture (the model.* genes), and at the end end_event, end_round (and error for FAIL);
  ``restores`` (how often the member's process died during the segment and it was restored
  from its own state: the segment goes on) and ``last_restore`` ({round, step, why, source}).

Resume: which trial each member's live segment is sits in ``optuna_segments.json`` in the store.
A stopped (or failed) search leaves its live segments RUNNING; the next session reconnects to the
same study and keeps reporting into them when the member's hyperparameters are unchanged, so a
segment spans the stop. RUNNING trials that no member continues (the member changed while no
monitor watched, or a crash between creating a trial and saving the file) are marked FAIL with
end_event "lost". Segments end for good only with ``close("finished")``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Mapping

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import Trial, TrialState

from population.monitor import SEGMENT_EVENTS, evaluated

if TYPE_CHECKING:
    from population.config import SearchSetup
    from population.store import RunStore

DB_FILE = "optuna.db"
JOURNAL_FILE = "optuna.journal"
SEGMENTS_FILE = "optuna_segments.json"


def storage_url(store: RunStore) -> str | None:
    """The SQLite URL of a local store's study (what optuna-dashboard opens), else None."""
    path = store.local_path(DB_FILE)
    return None if path is None else f"sqlite:///{path}"


class OptunaSink:
    """One trial per hyperparameter segment, in a study stored with the run."""

    name = "optuna"

    def __init__(self, setup: SearchSetup, store: RunStore, resumed: bool) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)   # no line per finished trial
        self.store = store
        self.resumed = resumed
        space = setup.space
        self.distributions = {g.path: g.to_optuna() for g in space.genes if not g.is_architecture}
        self.architecture = [g.path for g in space.genes if g.is_architecture]
        self.tmp: str | None = None
        url = storage_url(store)
        if url is not None:
            self.storage: optuna.storages.BaseStorage = RDBStorage(url)
        else:   # object stores cannot hold a database: a journal file, mirrored after each round
            self.tmp = tempfile.mkdtemp(prefix="evo-optuna-")
            path = os.path.join(self.tmp, JOURNAL_FILE)
            with open(path, "w") as f:
                f.write(store.read_text(JOURNAL_FILE) if store.exists_path(JOURNAL_FILE) else "")
            self.storage = JournalStorage(JournalFileBackend(path))
        self.study = optuna.create_study(
            storage=self.storage, study_name=setup.name, direction="minimize", load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(seed=setup.seed))   # never samples: params are fixed
        self.study_id = self.storage.get_study_id_from_name(setup.name)
        # member id -> {"trial": number, "event", "round", "last": [step, val_bpb] | None}
        self.segments: dict[int, dict] = {}
        self.trials: dict[int, Trial] = {}   # the live segments' Trial objects, by member

    # -- the monitor's calls ---------------------------------------------------------------------

    def start(self, members: list[dict], round: int) -> None:
        saved: dict[str, dict] = {}
        mirrored: int | None = None   # the last round the saved segments describe
        if self.store.exists_path(SEGMENTS_FILE):
            payload = json.loads(self.store.read_text(SEGMENTS_FILE))
            saved, mirrored = payload.get("segments", {}), payload.get("round")
        self._drop_waiting()
        for m in members:
            mid, seg = int(m["id"]), saved.get(str(m["id"]))
            if seg is not None and self._continues(seg, m):
                self.segments[mid] = seg
                history = m.get("history") or []
                if history and mirrored is not None and mirrored < round:
                    # the driver died between a commit and its on_round: report what it missed
                    self._report(mid, int(history[-1][0]), float(history[-1][1]))
            else:
                event = "resume" if self.resumed or round > 0 else "born"
                self._open(mid, m["genome"], event, round, parents=[], step=int(m.get("step", 0)))
        live = {seg["trial"] for seg in self.segments.values()}
        for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in live:
                trial = Trial(self.study, self.storage.get_trial_id_from_study_id_trial_number(
                    self.study_id, t.number))
                trial.set_user_attr("end_event", "lost")
                trial.set_user_attr("end_round", round)
                self.study.tell(trial, state=TrialState.FAIL)
        self._save(round)

    def on_round(self, round: int, members: list[dict], lineage: list[dict],
                 results: Mapping[int, Any]) -> None:
        for mid, res in sorted(evaluated(results).items()):
            if mid in self.segments:
                self._report(mid, int(res["step"]), float(res["val_bpb"]))
        for rec in lineage:
            mid, event = int(rec["member"]), rec["event"]
            if event == "died":
                if mid in self.segments:
                    self._end(mid, TrialState.FAIL, "died", round, error=rec.get("error"))
            elif event == "restored":
                if mid in self.segments:
                    self._restored(mid, rec)
            elif event in SEGMENT_EVENTS:
                if mid in self.segments:
                    self._end(mid, TrialState.COMPLETE, event, round)
                self._open(mid, rec["genome"], event, round, parents=list(rec.get("parents") or []),
                           step=int(rec.get("step") or 0), how=rec.get("how"))
        self._save(round)

    def close(self, status: str) -> None:
        if status == "finished":
            for mid in sorted(self.segments):
                self._end(mid, TrialState.COMPLETE, "finished", None)
            self._save(None)
        elif self.tmp is not None:
            self._upload()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if isinstance(self.storage, RDBStorage):
            self.storage.engine.dispose()   # close the SQLite file

    # -- segments --------------------------------------------------------------------------------

    def _open(self, mid: int, genome: Mapping[str, Any], event: str, round: int, parents: list[int],
              step: int, how: str | None = None) -> None:
        """A new RUNNING trial for member ``mid``'s segment that starts now with ``genome``."""
        attrs: dict[str, Any] = {
            "member": mid, "event": event, "round": round, "start_step": step,
            "parent": parents[0] if parents else None, "parents": parents,
            "architecture": {p: genome[p] for p in self.architecture if p in genome},
        }
        if how is not None:
            attrs["how"] = how
        self.study.enqueue_trial({p: genome[p] for p in self.distributions}, user_attrs=attrs)
        trial = self.study.ask(fixed_distributions=self.distributions)   # pops the enqueued trial
        self.trials[mid] = trial
        self.segments[mid] = {"trial": trial.number, "event": event, "round": round, "last": None}

    def _restored(self, mid: int, rec: Mapping[str, Any]) -> None:
        """Member ``mid``'s process died and it was restored from its own state: its segment
        goes on (same hyperparameters) and counts the restore."""
        seg = self.segments[mid]
        seg["restores"] = int(seg.get("restores", 0)) + 1
        trial = self._trial(mid)
        trial.set_user_attr("restores", seg["restores"])
        trial.set_user_attr("last_restore", {"round": rec.get("round"), "step": rec.get("step"),
                                             "why": rec.get("error"), "source": rec.get("source")})

    def _report(self, mid: int, step: int, value: float) -> None:
        seg = self.segments[mid]
        if seg["last"] is not None and step <= seg["last"][0]:
            return   # reported already (Optuna keeps one value per step)
        self._trial(mid).report(value, step)
        seg["last"] = [step, value]

    def _end(self, mid: int, state: TrialState, end_event: str, round: int | None,
             error: str | None = None) -> None:
        seg, trial = self.segments[mid], self._trial(mid)
        trial.set_user_attr("end_event", end_event)
        trial.set_user_attr("end_round", round)
        if error is not None:
            trial.set_user_attr("error", str(error))
        if state == TrialState.COMPLETE and seg["last"] is None:
            state = TrialState.PRUNED   # ended before it was ever evaluated
        if state == TrialState.COMPLETE:
            self.study.tell(trial, seg["last"][1])
        else:
            self.study.tell(trial, state=state)
        del self.segments[mid]
        self.trials.pop(mid, None)

    def _trial(self, mid: int) -> Trial:
        """The Trial of member ``mid``'s live segment (rebuilt from its number after a resume)."""
        if mid not in self.trials:
            number = self.segments[mid]["trial"]
            self.trials[mid] = Trial(self.study, self.storage.get_trial_id_from_study_id_trial_number(
                self.study_id, number))
        return self.trials[mid]

    def _continues(self, seg: dict, member: Mapping[str, Any]) -> bool:
        """Whether a saved segment is still the member's: its trial runs with the same params."""
        try:
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, seg["trial"])
        except KeyError:
            return False
        frozen = self.storage.get_trial(trial_id)
        genome = member["genome"]
        return frozen.state == TrialState.RUNNING and all(
            frozen.params.get(p) == genome.get(p) for p in self.distributions)

    def _drop_waiting(self) -> None:
        """Fail trials left enqueued by a session that died between enqueue and ask."""
        for _ in self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,)):
            trial = self.study.ask()
            trial.set_user_attr("end_event", "lost")
            self.study.tell(trial, state=TrialState.FAIL)

    def _save(self, round: int | None) -> None:
        payload = {"study": self.study.study_name, "round": round,
                   "segments": {str(m): s for m, s in sorted(self.segments.items())}}
        self.store.write_text(SEGMENTS_FILE, json.dumps(payload, indent=1, sort_keys=True) + "\n")
        if self.tmp is not None:
            self._upload()

    def _upload(self) -> None:
        with open(os.path.join(self.tmp, JOURNAL_FILE)) as f:
            self.store.write_text(JOURNAL_FILE, f.read())
